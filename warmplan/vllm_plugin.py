"""vLLM's entry points into warmplan.

* ``register`` - the ``vllm.general_plugins`` entry point (``pyproject.toml``):
  with ``WARMPLAN_PLAN`` set, every worker runs that plan inside its kernel warmup.
* ``WarmplanWorkerExtension`` - for ``--worker-extension-cls``: ``warmplan_run``
  over ``collective_rpc``.

Both live in :mod:`warmplan.workers.vllm`, the one module that imports vLLM; see
``docs/vllm.md``.
"""

from __future__ import annotations

from warmplan.workers.vllm import WarmplanWorkerExtension, register

__all__ = ["WarmplanWorkerExtension", "register"]
