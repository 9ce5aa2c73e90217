"""Deprecated: the rank worlds live in ``warmplan.world``. Kept so that existing
imports (``from warmplan.dist import World, WorldError, WorldTimeout``) keep working
until their callers move."""

from __future__ import annotations

from warmplan.world import (
    DEFAULT_TIMEOUT_S,
    LocalWorld,
    World,
    WorldError,
    WorldTimeout,
    current_world,
    launched,
    set_current_world,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "LocalWorld",
    "World",
    "WorldError",
    "WorldTimeout",
    "current_world",
    "launched",
    "set_current_world",
]
