"""One rank that joins the world through ``current_world``, gathers a few times and
exits with the code in ``WP_JOB`` (``code``) through the interpreter's normal exit, as
the CLI does. With ``close`` in the job it closes the world first and exits 9 unless a
gather after that raises ``WorldError``. Used by ``test_world_exit.py``."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from warmplan.world import WorldError, current_world


def main() -> int:
    job = json.loads(os.environ["WP_JOB"])
    world = current_world(timeout_s=60)
    for i in range(3):
        world.all_gather_str(str(i), timeout_s=60)
    if job.get("close"):
        world.close()  # type: ignore[attr-defined]
        try:
            world.all_gather_str("after", timeout_s=5)
        except WorldError as exc:
            print(f"CLOSED {exc}", file=sys.stderr)
        else:
            return 9
    return int(job["code"])


if __name__ == "__main__":
    raise SystemExit(main())
