"""Autotuning: the cache file (``cache``), the policies that decide who tunes and how
ranks agree (``policy``), and backends usable by any worker (``flashinfer``; ``fake``
for tests). The step itself is ``warmplan.steps.autotune``."""
