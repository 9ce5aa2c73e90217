"""Autotune backends of the built-in engine: ``builtin`` and ``triton``.

``builtin`` chooses, per power-of-two token bucket, between the two attention
implementations (``sdpa`` and ``matmul``) by timing both. The choice is a Python
string argument of the compiled forward, so each implementation is its own entry
in the compile cache: tuning compiles both, and loading a choice after warmup
selects a graph that already exists (no recompile).

``triton`` (CUDA only) exports and loads the configs ``triton.autotune`` chose for
the engine's autotuned kernels, per autotune key.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import torch

from warmplan.workers.base import AutotuneLoadError
from warmplan.workers.builtin.attention import ATTENTION_IMPLS
from warmplan.workers.builtin.kernels import TRITON_IMPORT_ERROR, triton_autotuners

if TYPE_CHECKING:
    from warmplan.workers.builtin.runner import ModelRunner

BUILTIN_FORMAT: Final = "warmplan-builtin-attention/1"
TRITON_FORMAT: Final = "warmplan-builtin-triton/1"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _loads(payload: bytes, fmt: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AutotuneLoadError(f"autotune payload is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise AutotuneLoadError(f'autotune payload "format" must be {fmt!r}: {got!r}')
    return data


class BuiltinAutotuneBackend:
    """Times ``sdpa`` against ``matmul`` attention per token bucket."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner

    @property
    def name(self) -> str:
        return "builtin"

    @property
    def version(self) -> str:
        return "1"

    def unavailable_reason(self) -> str | None:
        return None

    def metadata(self) -> Mapping[str, str]:
        cfg = self._runner.config
        return {
            "format": BUILTIN_FORMAT,
            "preset": cfg.preset,
            "device": self._runner.device.type,
            "dtype": str(self._runner.dtype).removeprefix("torch."),
            "torch": torch.__version__,
        }

    @contextlib.contextmanager
    def tuning(self) -> Iterator[None]:
        tuner = self._runner.tuner
        previous, tuner.tuning = tuner.tuning, True
        try:
            yield
        finally:
            tuner.tuning = previous

    def export(self) -> bytes:
        choices = self._runner.tuner.choices
        if not choices:
            return b""
        return _dumps(
            {
                "format": BUILTIN_FORMAT,
                "metadata": dict(self.metadata()),
                "choices": {str(k): v for k, v in sorted(choices.items())},
            }
        )

    def load(self, payload: bytes) -> None:
        if payload == b"":
            return
        data = _loads(payload, BUILTIN_FORMAT)
        if data.get("metadata") != dict(self.metadata()):
            raise AutotuneLoadError(
                f"autotune payload was tuned for {data.get('metadata')!r}, this worker is {dict(self.metadata())!r}"
            )
        raw = data.get("choices")
        if not isinstance(raw, dict):
            raise AutotuneLoadError(f'autotune payload "choices" must be an object: {raw!r}')
        choices: dict[int, str] = {}
        for key, impl in raw.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) >= 1):
                raise AutotuneLoadError(f"autotune bucket must be a positive integer: {key!r}")
            if impl not in ATTENTION_IMPLS:
                raise AutotuneLoadError(
                    f"autotune choice for bucket {key} must be one of {', '.join(ATTENTION_IMPLS)}: {impl!r}"
                )
            choices[int(key)] = impl
        self._runner.tuner.choices = choices


class TritonAutotuneBackend:
    """Exports/loads the configs of the engine's ``triton.autotune`` kernels (CUDA only)."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner

    @property
    def name(self) -> str:
        return "triton"

    @property
    def version(self) -> str:
        try:
            import triton

            return str(triton.__version__)
        except ImportError:
            return "none"

    def unavailable_reason(self) -> str | None:
        if self._runner.device.type != "cuda":
            return f"triton autotuning needs a CUDA device; this worker runs on {self._runner.device.type}"
        if TRITON_IMPORT_ERROR is not None:
            return f"triton is not importable: {TRITON_IMPORT_ERROR}"
        return None

    def metadata(self) -> Mapping[str, str]:
        meta = {"format": TRITON_FORMAT, "triton": self.version, "torch": torch.__version__}
        if self._runner.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self._runner.device)
            meta["arch"] = f"sm_{major}{minor}"
        return meta

    @contextlib.contextmanager
    def tuning(self) -> Iterator[None]:
        # triton.autotune benchmarks every config the first time it sees a key.
        yield

    def export(self) -> bytes:
        kernels: dict[str, list[Any]] = {}
        for name, tuner in sorted(triton_autotuners().items()):
            entries = []
            for key, cfg in tuner.cache.items():
                entries.append(
                    [
                        list(key),
                        {
                            "kwargs": dict(cfg.kwargs),
                            "num_warps": cfg.num_warps,
                            "num_stages": cfg.num_stages,
                        },
                    ]
                )
            if entries:
                kernels[name] = sorted(entries, key=lambda e: json.dumps(e[0]))
        if not kernels:
            return b""
        return _dumps(
            {"format": TRITON_FORMAT, "metadata": dict(self.metadata()), "kernels": kernels}
        )

    def load(self, payload: bytes) -> None:
        if payload == b"":
            return
        reason = self.unavailable_reason()
        if reason is not None:
            raise AutotuneLoadError(reason)
        import triton

        data = _loads(payload, TRITON_FORMAT)
        if data.get("metadata") != dict(self.metadata()):
            raise AutotuneLoadError(
                f"triton payload was tuned for {data.get('metadata')!r}, this worker is {dict(self.metadata())!r}"
            )
        tuners = triton_autotuners()
        kernels = data.get("kernels")
        if not isinstance(kernels, dict):
            raise AutotuneLoadError(f'triton payload "kernels" must be an object: {kernels!r}')
        installs: list[tuple[Any, tuple[Any, ...], Any]] = []
        for name, entries in kernels.items():
            if name not in tuners:
                raise AutotuneLoadError(
                    f"unknown autotuned kernel {name!r}; expected one of {', '.join(tuners)}"
                )
            try:
                for key, cfg in entries:
                    config = triton.Config(
                        dict(cfg["kwargs"]),
                        num_warps=int(cfg["num_warps"]),
                        num_stages=int(cfg["num_stages"]),
                    )
                    installs.append((tuners[name], tuple(key), config))
            except (TypeError, KeyError, ValueError) as exc:
                raise AutotuneLoadError(f"bad triton config for kernel {name!r}: {exc!r}") from None
        for tuner, key, config in installs:
            tuner.cache[key] = config


class UnavailableBackend:
    """A backend this engine cannot tune, that says why (the autotune step skips with it)."""

    def __init__(self, name: str, reason: str) -> None:
        self._name = name
        self._reason = reason

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return "unavailable"

    def unavailable_reason(self) -> str | None:
        return self._reason

    def metadata(self) -> Mapping[str, str]:
        return {}

    def tuning(self) -> contextlib.AbstractContextManager[None]:
        raise AutotuneLoadError(self._reason)

    def export(self) -> bytes:
        return b""

    def load(self, payload: bytes) -> None:
        raise AutotuneLoadError(self._reason)


def flashinfer_backend(runner: ModelRunner) -> Any:
    """FlashInfer's autotuner over the engine's ``mm_bf16`` GEMMs, or why there is none."""
    if not runner.flashinfer_gemm:
        return UnavailableBackend(
            "flashinfer",
            f"the built-in engine calls no FlashInfer op: {runner.flashinfer_gemm_reason}",
        )
    from warmplan.autotune.flashinfer import FlashInferBackend

    return FlashInferBackend()
