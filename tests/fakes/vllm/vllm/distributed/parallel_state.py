"""``get_world_group()``: the calling thread's fake rank (``vllm._fake.set_world_group``)."""

from vllm._fake import GroupCoordinator, world_group

__all__ = ["GroupCoordinator", "get_world_group"]


def get_world_group():
    return world_group()
