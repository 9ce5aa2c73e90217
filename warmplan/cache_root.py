"""One cache root for everything a warm start reads.

A restarted worker is warm only if every cache it relies on survived: inductor's
(FX graphs, compiled C++/Triton), Triton's (kernel binaries, launchers, autotune
results), FlashInfer's JIT modules, and warmplan's own (autotune files, the built-in
engine's ahead-of-time functions). By default these live in four unrelated places
(``/tmp/torchinductor_$USER``, ``~/.triton/cache``, ``~/.cache/flashinfer``,
``~/.cache/warmplan``), some of which a container restart or a tmp cleaner drops.
``unify`` puts them under the warmplan cache root (``$WARMPLAN_CACHE_ROOT``, else
``~/.cache/warmplan``), as SGLang does, so one directory is what a deployment keeps
(a volume) and what ``compile_cache`` shares across ranks:

```
<root>/inductor     TORCHINDUCTOR_CACHE_DIR
<root>/triton       TRITON_CACHE_DIR
<root>/flashinfer   FLASHINFER_WORKSPACE_BASE (FlashInfer adds .cache/flashinfer)
<root>/aot          the built-in engine's AOT functions
<root>/autotune     autotune cache files (the plans' default template)
```

An operator's own setting of any of these variables wins and is left alone. Nothing
here depends on the host, an address or a process id.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Final

from warmplan.fsutil import default_cache_root

# The tool's directory under the root, by the environment variable that names it.
ENV_DIRS: Final[dict[str, str]] = {
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "TRITON_CACHE_DIR": "triton",
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",
}
AOT_DIR: Final = "aot"


def layout(root: str) -> dict[str, str]:
    """The directories under ``root``, by tool (``inductor``, ``triton``,
    ``flashinfer``, ``aot``)."""
    dirs = {name: os.path.join(root, name) for name in ENV_DIRS.values()}
    dirs[AOT_DIR] = os.path.join(root, AOT_DIR)
    return dirs


def unify(root: str | None = None, env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Point inductor, Triton and FlashInfer at ``root`` (default: the warmplan cache
    root) where the operator has not chosen a directory, before any of them reads its
    setting; returns the directory each tool uses now (the ``aot`` one included).

    Inductor and Triton read their variables when they use a cache, FlashInfer when it
    is imported: call this before ``import flashinfer``.
    """
    env = os.environ if env is None else env
    root = root or default_cache_root()
    dirs = layout(root)
    used: dict[str, str] = {}
    for var, name in ENV_DIRS.items():
        if not env.get(var):
            env[var] = dirs[name]
        used[name] = env[var]
    used[AOT_DIR] = dirs[AOT_DIR]
    return used
