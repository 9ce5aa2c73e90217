"""``python -m warmplan``: the same as the ``warmplan`` command."""

from warmplan.cli import main

raise SystemExit(main())
