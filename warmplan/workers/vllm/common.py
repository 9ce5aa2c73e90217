"""What every vLLM runner layout shares: versions, the world group, FlashInfer's
autotuner as vLLM drives it, and the error for what the installed vLLM cannot do.

Every ``import vllm`` of warmplan lives in :mod:`warmplan.workers.vllm`, inside
functions: importing it needs torch but not vLLM.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from warmplan.errors import WarmplanError
from warmplan.log import get_logger
from warmplan.workers.base import (
    AutotuneLoadError,
)

log = get_logger(__name__)

__all__ = [
    "BACKEND_NAMES",
    "UnsupportedByVllm",
    "VllmFlashInferBackend",
    "dist_version",
    "flashinfer_version",
    "vllm_version",
]

# "flashinfer": FlashInfer's general autotuner (vLLM's flashinfer_autotune).
# "flashinfer_dsv4_decode": the DeepSeek-V4 SM120 sparse-MLA decode autotuner
# (vLLM's _deepseek_v4_sparse_mla_decode_autotune), a separate FlashInfer context.
BACKEND_NAMES: tuple[str, ...] = ("flashinfer", "flashinfer_dsv4_decode")


class UnsupportedByVllm(WarmplanError):
    """The installed vLLM cannot do what a step asks (a keyword its API lacks).

    Raised before anything ran; the executor names the step it came from.
    """

    exit_code = 2

    def __init__(self, message: str, *, keyword: str, vllm_version: str) -> None:
        self.keyword = keyword
        self.vllm_version = vllm_version
        super().__init__(message)


def vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except ImportError:
        return "not installed"


def dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def flashinfer_version() -> str | None:
    version = dist_version("flashinfer-python", "flashinfer")
    if version is not None:
        return version
    module = sys.modules.get("flashinfer")
    if module is None and importlib.util.find_spec("flashinfer") is not None:
        try:
            module = importlib.import_module("flashinfer")
        except ImportError:
            module = None
    return None if module is None else str(getattr(module, "__version__", "unknown"))


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


class VllmFlashInferBackend:
    """FlashInfer autotuning the way vLLM drives it.

    ``flashinfer``: ``vllm.utils.flashinfer.autotune(tune_mode=True, cache=FILE)``
    (FlashInfer's ``autotuner.autotune`` when vLLM has no such helper), as vLLM's
    ``flashinfer_autotune`` does. ``flashinfer_dsv4_decode``:
    ``flashinfer.sparse_mla_sm120_decode_dsv4_autotune(cache_path=FILE)``, as vLLM's
    DeepSeek-V4 SM120 decode autotune does. Either way FlashInfer writes the tuned
    configs to FILE when the context exits; ``export`` returns that file's bytes and
    ``load`` hands a payload to ``AutoTuner.get().load_configs``.
    """

    def __init__(self, name: str, *, vllm_config: Any = None, worker: Any = None) -> None:
        if name not in BACKEND_NAMES:
            raise ValueError(
                f"unknown FlashInfer backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}"
            )
        self._name = name
        self._dir: str | None = None
        self._lock = threading.Lock()
        self._vllm_config = vllm_config
        self._worker = worker  # vLLM's Worker: its KV cache's reserve is kept out of tuning

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return flashinfer_version() or "unavailable"

    def _workdir(self) -> Path:
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix=f"warmplan-{self._name}-")
                weakref.finalize(self, shutil.rmtree, self._dir, True)
            return Path(self._dir)

    @property
    def _tuned_file(self) -> Path:
        return self._workdir() / "tuned.json"

    def unavailable_reason(self) -> str | None:
        try:
            from vllm.utils.flashinfer import has_flashinfer
        except ImportError:
            has_flashinfer = None
        if has_flashinfer is not None and not has_flashinfer():
            return "vLLM reports FlashInfer unavailable (vllm.utils.flashinfer.has_flashinfer() is False)"
        try:
            from flashinfer.autotuner import AutoTuner  # noqa: F401
        except ImportError as exc:
            return f"flashinfer.autotuner.AutoTuner cannot be imported: {exc}"
        if self._name == "flashinfer_dsv4_decode":
            try:
                from flashinfer import sparse_mla_sm120_decode_dsv4_autotune  # noqa: F401
            except ImportError:
                return "this FlashInfer build does not expose sparse_mla_sm120_decode_dsv4_autotune"
        return None

    def metadata(self) -> Mapping[str, str]:
        return {
            "backend": self._name,
            "flashinfer": self.version,
            "vllm": vllm_version(),
            "torch": torch.__version__,
        }

    def _context(
        self, cache: str, skip_ops: tuple[str, ...] = ()
    ) -> contextlib.AbstractContextManager[Any]:
        if self._name == "flashinfer_dsv4_decode":
            from flashinfer import sparse_mla_sm120_decode_dsv4_autotune

            ctx: contextlib.AbstractContextManager[Any] = sparse_mla_sm120_decode_dsv4_autotune(
                cache_path=cache
            )
            return ctx
        try:
            from vllm.utils.flashinfer import autotune
        except ImportError:
            from flashinfer.autotuner import autotune
        if skip_ops:
            return autotune(tune_mode=True, cache=cache, skip_ops=set(skip_ops))  # type: ignore[no-any-return]
        return autotune(tune_mode=True, cache=cache)  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def tuning(self, *, skip_ops: tuple[str, ...] = ()) -> Iterator[None]:
        path = self._tuned_file
        path.unlink(missing_ok=True)  # export() returns this tuning's results only
        with (
            self._outside_kv_cache_reserve(),
            torch.inference_mode(),
            self._context(str(path), skip_ops),
        ):
            yield

    def _outside_kv_cache_reserve(self) -> contextlib.AbstractContextManager[Any]:
        """vLLM 0.34's ``_outside_kv_cache_transient_window(worker)``, as its
        ``kernel_warmup`` wraps FlashInfer's autotune: an extensible KV cache keeps the
        warmup's allocator peak free, and tuning's scratch buffers are not a serving
        transient. Nothing where vLLM has no such window (the seed's layout)."""
        if self._worker is None:
            return contextlib.nullcontext()
        try:
            from vllm.model_executor.warmup import kernel_warmup as kw
        except ImportError:
            return contextlib.nullcontext()
        window = getattr(kw, "_outside_kv_cache_transient_window", None)
        runner = getattr(self._worker, "model_runner", None)
        if window is None or not hasattr(runner, "extensible_kv_cache"):
            return contextlib.nullcontext()
        return window(self._worker)  # type: ignore[no-any-return]

    # -- tuning together, vLLM 0.34's way (warmplan.autotune.policy.RankedBackend) --------

    @property
    def tunes_together(self) -> bool:
        """``flashinfer``'s results are FlashInfer tables; the DSv4 decode tuner's are not."""
        return self._name == "flashinfer"

    def running_metadata(self) -> Mapping[str, str] | None:
        try:
            from flashinfer.autotuner import _collect_metadata

            return {str(k): str(v) for k, v in _collect_metadata().items()}
        except Exception:
            return None

    def clear(self) -> None:
        from flashinfer.autotuner import AutoTuner

        AutoTuner.get().clear_cache()

    def tune_process_group(self, world: Any) -> Any:
        """vLLM's tune group (TP when PP > 1, else the world), as ``flashinfer_autotune``."""
        from warmplan.workers.vllm.autotune_cache import tune_group

        group = tune_group()
        if group is None and world.world_size > 1:
            group = getattr(world, "process_group", None)
        return group

    @contextlib.contextmanager
    def tuning_together(self, *, group: Any, skip_ops: tuple[str, ...]) -> Iterator[None]:
        import flashinfer.autotuner

        setter: Any = getattr(flashinfer.autotuner, "set_autotune_process_group", None)
        if group is not None and setter is None:
            raise AutotuneLoadError(
                f"flashinfer {self.version} has no autotuner.set_autotune_process_group: "
                "ranks cannot tune together (use policy leader, or a newer flashinfer)"
            )
        if setter is not None:
            setter(group)
        try:
            with self.tuning(skip_ops=skip_ops):
                yield
        finally:
            if setter is not None:
                setter(None)

    @contextlib.contextmanager
    def pass_scope(
        self, *, buckets: tuple[int, ...] | None, round_up: bool | None
    ) -> Iterator[None]:
        """One tuning pass as vLLM 0.34 runs it: under ``vllm.utils.flashinfer.autotune(
        tuning_buckets=, round_up=)``, the pass's forward, then the ops a dummy run
        never reaches (the DSv4.1 indexer's ``wq_b``: ``autotune_indexer_wq_b(model,
        max M)``, where the installed vLLM has it) tuned for the same buckets."""
        if buckets is None and round_up is None:
            scope: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        else:
            try:
                from vllm.utils.flashinfer import autotune
            except ImportError:
                from flashinfer.autotuner import autotune
            kw: dict[str, Any] = {}
            if buckets is not None:
                kw["tuning_buckets"] = buckets
            if round_up is not None:
                kw["round_up"] = round_up
            scope = autotune(**kw)
        with scope:
            yield
            if buckets and self._name == "flashinfer":
                self._tune_unreached_ops(max(buckets))

    def _tune_unreached_ops(self, max_tokens: int) -> None:
        runner = getattr(self._worker, "model_runner", None)
        get_model = getattr(runner, "get_model", None)
        if get_model is None:
            return
        try:
            from vllm.models.deepseek_v41.attention import autotune_indexer_wq_b
        except ImportError:  # a vLLM without DSv4.1, or without its CUDA deps here
            return
        autotune_indexer_wq_b(get_model(), max_tokens)

    def vllm_cache_file(self, rank: int) -> Any:
        """vLLM's own file for this rank (``warmplan.workers.vllm.autotune_cache``), or
        ``None`` when no vLLM config is at hand (then warmplan computes the layout)."""
        config = self._vllm_config
        if config is None:
            try:
                from vllm.config import get_current_vllm_config_or_none

                config = get_current_vllm_config_or_none()
            except ImportError:
                config = None
        if config is None:
            return None
        from warmplan.workers.vllm.autotune_cache import vllm_cache_file

        return vllm_cache_file(config, rank)

    def export(self) -> bytes:
        path = self._tuned_file
        return path.read_bytes() if path.exists() else b""

    def load(self, payload: bytes) -> None:
        if not payload:
            return
        path = self._workdir() / "loaded.json"
        path.write_bytes(payload)
        try:
            from flashinfer.autotuner import AutoTuner

            loaded = AutoTuner.get().load_configs(str(path))
        except Exception as exc:
            raise AutotuneLoadError(
                f"FlashInfer refused the tuning payload ({len(payload)} bytes): {exc}"
            ) from exc
        if loaded is False:  # FlashInfer would fall back to untuned defaults silently
            raise AutotuneLoadError(
                f"FlashInfer's AutoTuner.load_configs rejected the tuning payload ({len(payload)} bytes)"
            )
