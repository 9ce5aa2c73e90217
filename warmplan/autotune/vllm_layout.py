"""vLLM 0.34's FlashInfer autotune cache layout (``cache: {identity: vllm}``), so that
a table warmplan tunes serves a plain vLLM start and the other way round.

vLLM keeps one file per rank, FlashInfer's own JSON table as ``save_configs`` writes
it (no wrapper), at::

    <root>/<config_hash>/autotune_configs_dp<dp_rank>_rank<rank>.json
    root = $VLLM_FLASHINFER_AUTOTUNE_CACHE_DIR, else
           $VLLM_CACHE_ROOT/flashinfer_autotune_cache/<flashinfer version>/<flashinfer arch>

``$VLLM_CACHE_ROOT`` defaults to ``$XDG_CACHE_HOME/vllm`` (``~/.cache/vllm``); the
version and arch are the last two parts of FlashInfer's JIT workspace
(``flashinfer.jit.env.FLASHINFER_WORKSPACE_DIR``, e.g. ``0.7.2/90a``); ``rank`` is
the world rank. Inside vLLM the root, the config hash (the sha256 of
``vllm_config.compile_factors(include_version=False)``) and the file name come from
vLLM's own functions (``warmplan.workers.vllm.autotune_cache``); elsewhere from this
module, with warmplan's config hash.

flashinfer is imported lazily (only to read its workspace directory).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

SUBDIR = "flashinfer_autotune_cache"


def file_name(dp_rank: int, rank: int) -> str:
    """vLLM's per-rank file name."""
    return f"autotune_configs_dp{dp_rank}_rank{rank}.json"


def vllm_cache_root(env: Mapping[str, str] | None = None) -> str:
    """``$VLLM_CACHE_ROOT`` as vLLM 0.34 reads it."""
    e = os.environ if env is None else env
    default = os.path.join(
        e.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "vllm"
    )
    return os.path.expanduser(e.get("VLLM_CACHE_ROOT", default))


def workspace_parts(version: str, capability: tuple[int, int] | None) -> tuple[str, str]:
    """FlashInfer's ``(version, arch)`` workspace names: read from flashinfer when
    this process has imported it (resolution never imports it: ``warmplan plan``
    stays torch-free), else the version given and the arch FlashInfer would build for
    this device (``90a`` for 9.0; ``noarch`` without one)."""
    if "flashinfer" in sys.modules:
        try:
            from flashinfer.jit import env as jit_env

            ws = jit_env.FLASHINFER_WORKSPACE_DIR
            return str(ws.parent.name), str(ws.name)
        except Exception:
            pass
    if capability is None:
        return version, "noarch"
    major, minor = capability
    return version, f"{major}{minor}" + ("a" if major >= 9 else "")


def autotune_root(
    version: str, capability: tuple[int, int] | None, env: Mapping[str, str] | None = None
) -> str:
    """The root of vLLM's FlashInfer autotune cache."""
    e = os.environ if env is None else env
    override = e.get("VLLM_FLASHINFER_AUTOTUNE_CACHE_DIR")
    if override:
        return os.path.expanduser(override)
    fi_version, arch = workspace_parts(version, capability)
    return os.path.join(vllm_cache_root(e), SUBDIR, fi_version, arch)


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmCacheFile:
    """Where vLLM keeps (or would keep) this rank's table."""

    root: str
    config_hash: str
    dp_rank: int
    rank: int
    source: str  # "vllm" when vLLM's own functions named it, else "warmplan"

    @property
    def path(self) -> str:
        return os.path.join(
            self.root, _segment(self.config_hash), file_name(self.dp_rank, self.rank)
        )


def _segment(value: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", value)
    return "_" if cleaned in ("", ".", "..") else cleaned
