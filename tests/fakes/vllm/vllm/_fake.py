"""The recorder behind the fake: one global ``STATE`` that every fake call appends to.

An ``Event`` is ``(kind, name, data)``. Kinds:

* ``runner`` / ``block_table`` / ``buffer`` - what the equivalence test compares:
  dummy runs, slot-mapping calls and host-to-device copies, each with the runner
  buffers' contents at that moment (``state``);
* ``sync`` - ``torch.accelerator.synchronize`` (recorded when the tests patch it);
* ``tuning`` - FlashInfer tuning contexts entered and left, configs loaded;
* ``world`` - collectives on the world group;
* ``vllm`` - vLLM functions entered (kernel_warmup and its parts, graph capture).
"""

from __future__ import annotations

import hashlib
import threading
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any

import torch

Event = namedtuple("Event", ["kind", "name", "data"])

COMPARED_KINDS = frozenset({"runner", "block_table", "buffer"})


class NdArray:
    """A 1-D int32 host array with the numpy behaviour vLLM's warmup relies on:
    slices are views, ``copy()`` detaches, slice assignment writes through."""

    def __init__(self, data, start=0, stop=None):
        self._data = data if isinstance(data, list) else [int(x) for x in data]
        self._start = start
        self._stop = len(self._data) if stop is None else stop

    def __len__(self):
        return self._stop - self._start

    def _index(self, i):
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._start + i

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            assert step == 1
            return NdArray(self._data, self._start + start, self._start + max(start, stop))
        return self._data[self._index(key)]

    def __setitem__(self, key, value):
        if isinstance(key, slice):
            view = self[key]
            values = list(value)
            assert len(values) == len(view), (len(values), len(view))
            for i, v in enumerate(values):
                view._data[view._start + i] = int(v)
        else:
            self._data[self._index(key)] = int(value)

    def __iter__(self):
        return iter(self._data[self._start : self._stop])

    def copy(self):
        return NdArray(list(self))

    def tolist(self):
        return list(self)


class CpuGpuBuffer:
    """vLLM's paired host/device buffer (``vllm.v1.utils.CpuGpuBuffer``)."""

    def __init__(self, size, dtype=torch.int32, device="cpu", name="buffer"):
        self.np = NdArray([0] * size)
        self.cpu = None
        self.gpu = torch.zeros(size, dtype=dtype, device=device)
        self._name = name

    def copy_to_gpu(self, n=None):
        n = len(self.np) if n is None else n
        self.gpu[:n].copy_(torch.tensor(self.np[:n].tolist(), dtype=self.gpu.dtype))
        record("buffer", f"{self._name}.copy_to_gpu", {"n": n, "np": self.np[:n].tolist()})
        return self.gpu[:n]


def digest(t) -> str:
    values = t.tolist() if hasattr(t, "tolist") else list(t)
    return hashlib.sha256(repr(values).encode()).hexdigest()[:16]


@dataclass
class WorldHub:
    """Several fake ranks in threads of one process: broadcasts and barriers meet here."""

    world_size: int
    barrier: threading.Barrier = field(init=False)
    slots: list = field(init=False)

    def __post_init__(self):
        self.barrier = threading.Barrier(self.world_size, timeout=30)
        self.slots = [None] * self.world_size


class GroupCoordinator:
    """vLLM's ``GroupCoordinator`` as the warmup uses it."""

    def __init__(self, rank=0, world_size=1, local_rank=None, hub=None):
        self.rank_in_group = rank
        self.rank = rank
        self.local_rank = rank if local_rank is None else local_rank
        self.world_size = world_size
        self.ranks = list(range(world_size))
        self.cpu_group = object()
        self.device_group = object()
        self._hub = hub

    def broadcast_object(self, obj=None, src=0):
        record(
            "world",
            "broadcast_object",
            {"src": src, "sent": obj if self.rank_in_group == src else None},
        )
        if self.world_size == 1:
            return obj
        hub = self._hub
        if self.rank_in_group == src:
            hub.slots[src] = obj
        hub.barrier.wait()
        value = hub.slots[src]
        hub.barrier.wait()
        return value

    def barrier(self):
        record("world", "barrier", {})
        if self.world_size > 1:
            self._hub.barrier.wait()


class Platform:
    """``vllm.platforms.current_platform``: capability and family checks as vLLM has them."""

    def __init__(self):
        self.configure()

    def configure(self, *, device_name="cuda", capability=(9, 0), cuda_alike=True):
        self.device_name = device_name
        self.device_type = device_name
        self._capability = capability
        self._cuda_alike = cuda_alike

    def is_cuda_alike(self):
        return self._cuda_alike

    def get_device_capability(self, device_id=0):
        if self._capability is None:
            return None
        from vllm.platforms.interface import DeviceCapability

        return DeviceCapability(*self._capability)

    def has_device_capability(self, capability, device_id=0):
        current = self.get_device_capability(device_id)
        if current is None:
            return False
        if isinstance(capability, tuple):
            return current >= capability
        return current.to_int() >= capability

    def is_device_capability(self, capability, device_id=0):
        current = self.get_device_capability(device_id)
        if current is None:
            return False
        if isinstance(capability, tuple):
            return current == capability
        return current.to_int() == capability

    def is_device_capability_family(self, capability, device_id=0):
        current = self.get_device_capability(device_id)
        if current is None:
            return False
        return (current.to_int() // 10) == (capability // 10)


@dataclass
class State:
    log: list = field(default_factory=list)
    flashinfer_available: bool = True
    flashinfer_has_dsv4_decode_autotune: bool = True
    flashinfer_writes_cache: bool = True
    tuning: list = field(default_factory=list)  # stack of active tuning context names
    loaded_configs: list = field(default_factory=list)
    runner: Any = None
    kernel_warmup_impl: Any = None  # a module with vLLM's warmup functions (the oracle)
    local: threading.local = field(default_factory=threading.local)
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = State()
PLATFORM = Platform()
_DEFAULT_GROUP = GroupCoordinator()


def reset(
    *,
    capability=(9, 0),
    device_name="cuda",
    cuda_alike=True,
    flashinfer=True,
    dsv4_decode_autotune=True,
    writes_cache=True,
):
    """Forget every event and set the platform and FlashInfer's availability."""
    global _DEFAULT_GROUP
    STATE.log.clear()
    STATE.tuning.clear()
    STATE.loaded_configs.clear()
    STATE.flashinfer_available = flashinfer
    STATE.flashinfer_has_dsv4_decode_autotune = dsv4_decode_autotune
    STATE.flashinfer_writes_cache = writes_cache
    STATE.runner = None
    STATE.kernel_warmup_impl = None
    STATE.local = threading.local()
    PLATFORM.configure(device_name=device_name, capability=capability, cuda_alike=cuda_alike)
    _DEFAULT_GROUP = GroupCoordinator()


def set_world_group(group):
    """The world group of the calling thread (one thread per fake rank)."""
    STATE.local.group = group


def world_group():
    return getattr(STATE.local, "group", None) or _DEFAULT_GROUP


def buffers_state(runner):
    """The contents of every runner buffer a warmup may touch, compactly."""
    if runner is None:
        return None
    out = {}
    qsl = getattr(runner, "query_start_loc", None)
    if qsl is not None:
        out["query_start_loc.np"] = qsl.np[:4].tolist()
        out["query_start_loc.gpu"] = qsl.gpu[:4].tolist()
        out["query_start_loc.np#"] = digest(qsl.np)
        out["query_start_loc.gpu#"] = digest(qsl.gpu)
    positions = getattr(runner, "positions", None)
    if positions is not None:
        out["positions#"] = digest(positions)
    return out


def record(kind, name, data):
    data = dict(data)
    if kind in COMPARED_KINDS:
        data["state"] = buffers_state(STATE.runner)
        data["rank"] = world_group().rank_in_group
    with STATE.lock:
        STATE.log.append(Event(kind, name, data))


def events(*kinds, rank=None):
    """The recorded events of these kinds (all when none given), optionally of one rank."""
    out = [e for e in STATE.log if not kinds or e.kind in kinds]
    if rank is not None:
        out = [e for e in out if e.data.get("rank", rank) == rank]
    return out


def compared(rank=None):
    """What the equivalence test compares: runner, block-table and buffer events."""
    return [(e.kind, e.name, e.data) for e in events(*sorted(COMPARED_KINDS), rank=rank)]


def build(
    *,
    max_num_tokens=8192,
    max_num_batched_tokens=8192,
    max_num_seqs=256,
    backends=("V4_FLASHMLA_SPARSE",),
    pooling=False,
    enable_flashinfer_autotune=None,
    has_kernel_config_flag=True,
    has_query_start_loc=True,
    has_positions=True,
    has_max_num_tokens=True,
    model="deepseek-ai/DeepSeek-V4-Fake",
    tensor_parallel_size=1,
    pipeline_parallel_size=1,
    dummy_run_cls=None,
):
    """A fake vLLM ``Worker`` around a fake ``GPUModelRunner``; the runner's buffers
    hold recognisable non-zero contents so that a leak or a missed restore shows."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker, make_vllm_config

    config = make_vllm_config(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        enable_flashinfer_autotune=enable_flashinfer_autotune,
        has_kernel_config_flag=has_kernel_config_flag,
        model=model,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
    )
    runner_cls = dummy_run_cls or GPUModelRunner
    runner = runner_cls(
        config,
        max_num_tokens=max_num_tokens if has_max_num_tokens else None,
        backends=backends,
        pooling=pooling,
        has_query_start_loc=has_query_start_loc,
        has_positions=has_positions,
    )
    STATE.runner = runner
    return Worker(config, runner)
