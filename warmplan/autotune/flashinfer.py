"""The FlashInfer autotune backend, usable by any worker.

Tuning wraps the run in ``flashinfer.autotuner.autotune(tune_mode=True, cache=F)``
with ``F`` a private temp file, whose contents become the exported payload (the
warmplan cache file wraps it with its own metadata and checksum). Versions whose
``autotune()`` has no ``cache=`` (before 0.6.6) tune in memory and export through
``AutoTuner.get().save_configs``; without that either, the backend is unavailable
and says why. Loading writes the payload to a temp file and calls
``AutoTuner.get().load_configs``, whose ``False`` means every lookup would silently
fall back to untuned defaults: that raises ``AutotuneLoadError`` naming the
metadata that differs (e.g. cudnn-frontend installed on one side only).

flashinfer and torch are imported lazily; nothing here is needed on a CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from warmplan.workers.base import AutotuneLoadError

# Optional packages whose presence or version changes the tactics FlashInfer can pick
# (cuDNN plan indices, CuTe-DSL kernels, cuBLASLt algorithms).
OPTIONAL_PACKAGES: tuple[str, ...] = (
    "nvidia-cudnn-frontend",
    "nvidia-cutlass-dsl",
    "cuda-python",
    "cuda-bindings",
    "nvidia-cublas-cu12",
    "nvidia-cublas",
    "nvidia-cudnn-cu12",
    "nvidia-cudnn-cu13",
)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def optional_packages() -> str:
    """``name=version`` of each optional package present, comma-separated, sorted."""
    found = [(n, _dist_version(n)) for n in OPTIONAL_PACKAGES]
    return ",".join(f"{n}={v}" for n, v in found if v is not None) or "none"


class FlashInferBackend:
    """``AutotuneBackend`` over FlashInfer's ``AutoTuner``.

    ``require_cuda=False`` lets tests drive a fake ``flashinfer`` module on a CPU.
    """

    def __init__(self, *, module: str = "flashinfer", require_cuda: bool = True) -> None:
        self._module = module
        self._require_cuda = require_cuda
        self._exported = b""

    @property
    def name(self) -> str:
        return "flashinfer"

    def _autotuner(self) -> Any:
        return importlib.import_module(f"{self._module}.autotuner")

    @property
    def version(self) -> str:
        try:
            mod = importlib.import_module(self._module)
        except ImportError:
            return "absent"
        return str(
            getattr(mod, "__version__", None) or _dist_version("flashinfer-python") or "unknown"
        )

    def _has_cache_param(self, at: Any) -> bool:
        try:
            return "cache" in inspect.signature(at.autotune).parameters
        except (TypeError, ValueError):
            return False

    def unavailable_reason(self) -> str | None:
        try:
            at = self._autotuner()
        except ImportError as exc:
            return f"flashinfer is not installed (pip install 'warmplan[flashinfer]'): {exc}"
        if not hasattr(at, "autotune") or not hasattr(at, "AutoTuner"):
            return f"flashinfer {self.version} has no flashinfer.autotuner.autotune/AutoTuner"
        tuner = at.AutoTuner.get()
        if not hasattr(tuner, "load_configs"):
            return f"flashinfer {self.version} has no AutoTuner.load_configs; its tuning results cannot be loaded"
        if not self._has_cache_param(at) and not hasattr(tuner, "save_configs"):
            return (
                f"flashinfer {self.version}: autotune() has no cache= and AutoTuner has no "
                "save_configs, so tuning results cannot be exported (need flashinfer >= 0.6.6)"
            )
        if self._require_cuda:
            import torch

            if not torch.cuda.is_available():
                return "FlashInfer autotuning needs a CUDA device"
        return None

    def metadata(self) -> Mapping[str, str]:
        meta = {"flashinfer": self.version, "packages": optional_packages()}
        try:
            import torch

            meta["torch"] = str(torch.__version__)
            meta["cuda"] = str(torch.version.cuda or "none")
            if torch.cuda.is_available():
                meta["device"] = torch.cuda.get_device_name(torch.cuda.current_device())
        except ImportError:
            meta["torch"] = "absent"
        return meta

    @contextlib.contextmanager
    def tuning(self, *, skip_ops: tuple[str, ...] = ()) -> Iterator[None]:
        at = self._autotuner()
        tmpdir = tempfile.mkdtemp(prefix="warmplan-fi-")
        path = os.path.join(tmpdir, "flashinfer-autotune.json")
        kw: dict[str, Any] = {}
        if skip_ops:
            if "skip_ops" not in _params(at.autotune):
                raise AutotuneLoadError(f"flashinfer {self.version}: autotune() takes no skip_ops")
            kw["skip_ops"] = set(skip_ops)
        try:
            if self._has_cache_param(at):
                with at.autotune(tune_mode=True, cache=path, **kw):
                    yield
            else:
                with at.autotune(True):
                    yield
            if not os.path.isfile(path):
                # No new profiling (every shape hit the in-memory cache) or no cache=:
                # export everything the tuner holds.
                tuner = at.AutoTuner.get()
                if hasattr(tuner, "save_configs"):
                    tuner.save_configs(path)
            self._exported = b""
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    self._exported = f.read()
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def export(self) -> bytes:
        return self._exported

    # -- tuning together (warmplan.autotune.policy.RankedBackend) ----------------------

    @property
    def tunes_together(self) -> bool:
        return True

    def running_metadata(self) -> Mapping[str, str] | None:
        """FlashInfer's ``_collect_metadata()``: what ``load_configs`` demands of a table."""
        collect = getattr(self._autotuner(), "_collect_metadata", None)
        if not callable(collect):
            return None
        try:
            return {str(k): str(v) for k, v in collect().items()}
        except Exception:
            return None

    def clear(self) -> None:
        self._autotuner().AutoTuner.get().clear_cache()

    def tune_process_group(self, world: Any) -> Any:
        """The world's own process group (a gloo group), when it has more than one rank."""
        if world.world_size <= 1:
            return None
        return getattr(world, "process_group", None)

    @contextlib.contextmanager
    def tuning_together(self, *, group: Any, skip_ops: tuple[str, ...]) -> Iterator[None]:
        """``tuning()`` under FlashInfer's cross-rank timing reduction over ``group``
        (``set_autotune_process_group``), leaving ``skip_ops`` untuned."""
        at = self._autotuner()
        setter: Any = getattr(at, "set_autotune_process_group", None)
        if group is not None and not callable(setter):
            raise AutotuneLoadError(
                f"flashinfer {self.version} has no autotuner.set_autotune_process_group: "
                "ranks cannot tune together (use policy leader, or a newer flashinfer)"
            )
        if group is not None:
            setter(group)
        try:
            with self.tuning(skip_ops=skip_ops):
                yield
        finally:
            if group is not None:
                setter(None)

    def pass_scope(
        self, *, buckets: tuple[int, ...] | None, round_up: bool | None
    ) -> contextlib.AbstractContextManager[None]:
        """FlashInfer's ``autotune(True, tuning_buckets=, round_up=)`` around one pass."""
        if buckets is None and round_up is None:
            return contextlib.nullcontext()
        at = self._autotuner()
        params = _params(at.autotune)
        if "tuning_buckets" not in params:
            raise AutotuneLoadError(
                f"flashinfer {self.version}: autotune() takes no tuning_buckets/round_up"
            )
        kw: dict[str, Any] = {}
        if buckets is not None:
            kw["tuning_buckets"] = buckets
        if round_up is not None:
            kw["round_up"] = round_up
        cm: contextlib.AbstractContextManager[None] = at.autotune(True, **kw)
        return cm

    def load(self, payload: bytes) -> None:
        at = self._autotuner()
        tmpdir = tempfile.mkdtemp(prefix="warmplan-fi-")
        path = os.path.join(tmpdir, "flashinfer-autotune.json")
        try:
            with open(path, "wb") as f:
                f.write(payload)
            ok = at.AutoTuner.get().load_configs(path)
        except AutotuneLoadError:
            raise
        except Exception as exc:
            raise AutotuneLoadError(
                f"flashinfer load_configs raised {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if ok is False:
            raise AutotuneLoadError(
                "flashinfer AutoTuner.load_configs rejected the tuning results, so every "
                "lookup would fall back to untuned defaults: " + explain_rejection(at, payload)
            )


def _params(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def explain_rejection(at: Any, payload: bytes) -> str:
    """Compare the payload's ``_metadata`` with this process's, key by key."""
    try:
        theirs = json.loads(payload.decode("utf-8")).get("_metadata") or {}
    except (UnicodeDecodeError, ValueError, AttributeError):
        return "the payload is not FlashInfer JSON"
    collect = getattr(at, "_collect_metadata", None)
    if not callable(collect):
        return f"file metadata {theirs!r} (this flashinfer cannot report its own)"
    try:
        ours = collect()
    except Exception as exc:
        return f"file metadata {theirs!r}; collecting ours raised {exc}"
    diffs = [
        f"{k}: file has {theirs.get(k)!r}, this rank has {ours.get(k)!r}"
        for k in sorted(set(theirs) | set(ours))
        if theirs.get(k) != ours.get(k)
    ]
    return "; ".join(diffs) if diffs else "metadata matches; see flashinfer's log for the reason"
