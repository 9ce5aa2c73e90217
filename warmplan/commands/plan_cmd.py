"""``warmplan plan FILE --max-num-tokens N --max-num-batched-tokens M ...``: the
resolved plan, without running anything: a table, or JSON with ``--json``."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from warmplan.commands._common import load_plan_or_exit, print_json, print_table, tokens_text
from warmplan.errors import UserError
from warmplan.fsutil import default_cache_root
from warmplan.resolve import CacheContext, arch_of, resolve
from warmplan.steps.common import PLATFORMS
from warmplan.workers.base import Facts, Limits


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {value}")
    return value


def _capability(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected major.minor such as 9.0, found {text!r}")
    return int(m.group(1)), int(m.group(2) or 0)


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, found {text!r}")
    return key, value


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="show a plan resolved against given limits and facts, without running it"
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--max-num-tokens", type=_positive, required=True, metavar="N")
    p.add_argument("--max-num-batched-tokens", type=_positive, required=True, metavar="M")
    p.add_argument("--max-num-seqs", type=_positive, default=256, metavar="S")
    p.add_argument("--platform", choices=PLATFORMS, default="cuda")
    p.add_argument(
        "--device-capability", type=_capability, metavar="X.Y", help="CUDA capability, e.g. 9.0"
    )
    p.add_argument(
        "--attention-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="an attention backend name the worker has (repeatable)",
    )
    p.add_argument("--pooling", action="store_true", help="the model is a pooling model")
    p.add_argument(
        "--flag",
        action="append",
        type=_pair,
        default=[],
        metavar="NAME=true|false",
        help="a worker flag (repeatable)",
    )
    p.add_argument(
        "--env",
        action="append",
        type=_pair,
        default=[],
        metavar="K=V",
        help="set an environment variable for the gates (repeatable)",
    )
    p.add_argument("--world-size", type=_positive, default=1)
    p.add_argument("--rank", type=_positive, default=0)
    p.add_argument(
        "--cache-root",
        metavar="DIR",
        help="cache root for rendered cache paths (default: $WARMPLAN_CACHE_ROOT or ~/.cache/warmplan)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.world_size < 1:
        raise UserError(f"--world-size: expected an integer >= 1, found {args.world_size}")
    if args.rank >= args.world_size:
        raise UserError(
            f"--rank: expected a rank below --world-size ({args.world_size}), found {args.rank}"
        )
    plan = load_plan_or_exit(args.file)
    flags: dict[str, bool] = {}
    for name, value in args.flag:
        if value.lower() not in ("true", "false"):
            raise UserError(f"--flag {name}={value}: expected true or false")
        flags[name] = value.lower() == "true"
    if args.platform == "cpu" and args.device_capability:
        raise UserError("--device-capability applies to --platform cuda only")
    facts = Facts(
        platform=args.platform,
        device_capability=args.device_capability,
        attention_backends=tuple(args.attention_backend),
        pooling=args.pooling,
        flags=flags,
        env={**os.environ, **dict(args.env)},
    )
    limits = Limits(
        max_num_tokens=args.max_num_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
    )
    cache = CacheContext(
        cache_root=args.cache_root or default_cache_root(),
        arch=arch_of(facts),
        rank=args.rank,
        world_size=args.world_size,
    )
    resolved = resolve(plan, limits, facts, cache)
    keys = key_counts(plan, resolved.steps, limits, facts)
    if args.json:
        out = resolved.to_dict()
        for step in out.get("steps", []):
            if step["id"] in keys:
                step["compile_keys"] = keys[step["id"]]
        print_json(out)
        return 0
    rows = []
    for s in resolved.steps:
        status = s.skipped or (
            f"runs unless {s.replaced_by} runs its run" if s.replaced_by else "runs"
        )
        rows.append(
            {
                "step": s.id,
                "kind": s.kind,
                "tokens": tokens_text(s.requested, s.applied),
                "clamp": f"{s.clamp_to}={s.limit}",
                "detail": "; ".join(
                    x for x in (s.detail().strip(), _keys_text(keys.get(s.id))) if x
                ),
                "status": status,
            }
        )
    print(
        f"plan {plan.name} ({plan.path}): {sum(s.skipped is None for s in resolved.steps)} of {len(resolved.steps)} steps run"
    )
    print_table(rows, ["step", "kind", "tokens", "clamp", "detail", "status"])
    return 0


def key_counts(
    plan: Any, steps: Any, limits: Limits, facts: Facts
) -> dict[str, list[dict[str, Any]]]:
    """For each ``compile_keys`` step that runs: per kernel, the cases its domain
    expands to and the compile keys they are, on the built-in engine the plan's
    ``builtin`` block describes - before anything is built or compiled. Triton keys
    are bound for the plan's CUDA target (``--device-capability``, default 9.0)
    from this machine, GPU or not."""
    wanted = [s for s in steps if s.kind == "compile_keys" and s.skipped is None]
    if not wanted:
        return {}
    from warmplan.domains import DomainError
    from warmplan.workers.builtin.config import EngineConfig

    try:
        engine = EngineConfig.from_mapping(
            {
                **plan.builtin,
                "max_num_tokens": limits.max_num_tokens,
                "max_num_batched_tokens": limits.max_num_batched_tokens,
                "max_num_seqs": limits.max_num_seqs,
            }
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{plan.path}: builtin: {exc}") from None
    triton = facts.platform == "cuda"
    target = None
    if triton:
        major, minor = facts.device_capability or (9, 0)
        target = f"sm{major}{minor}"
    out: dict[str, list[dict[str, Any]]] = {}
    for s in wanted:
        rows: list[dict[str, Any]] = []
        try:
            rows = _keys_of(engine, s, limits, target)
        except DomainError as exc:
            raise UserError(f"{s.where_prefix}.{exc.path}: {exc.message}") from None
        out[s.id] = rows
    return out


def _keys_of(engine: Any, s: Any, limits: Limits, target: str | None) -> list[dict[str, Any]]:
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    from warmplan.workers.builtin.jit_keys import KeyModel

    model = KeyModel(engine, triton=target is not None)
    names = list(model.kernels()) if s.kernel == "*" else [s.kernel]
    rows: list[dict[str, Any]] = []
    for name in names:
        if name not in model.kernels():
            rows.append({"kernel": name, "note": "not a built-in kernel; counted when run"})
            continue
        uses_triton = target is not None and name != "forward"
        if uses_triton:
            try:
                from warmplan.workers.triton_target import target_driver
            except ImportError:  # pragma: no cover - the module itself has no imports
                raise
            try:
                import triton  # noqa: F401
            except ImportError:
                rows.append({"kernel": name, "note": "Triton is not installed here"})
                continue
            with target_driver(target):
                keyset, _ = model.keyset(name, s.domain, s.mode, limits)
        else:
            keyset, _ = model.keyset(name, s.domain, s.mode, limits)
        rows.append(
            {
                "kernel": name,
                "declared_cases": keyset.declared,
                "cases": keyset.cases,
                "keys": len(keyset.keys),
                "variants": sum(k.variants for k in keyset.keys),
                "labels": [k.label for k in keyset.keys],
                **({"target": target} if uses_triton else {}),
            }
        )
    return rows


def _keys_text(rows: list[dict[str, Any]] | None) -> str:
    if not rows:
        return ""
    parts = []
    for r in rows:
        if "note" in r:
            parts.append(f"{r['kernel']}: {r['note']}")
            continue
        text = f"{r['kernel']}: {r['declared_cases']} cases -> {r['keys']} keys"
        if r.get("target"):
            text += f" ({r['variants']} Triton variants, {r['target']})"
        parts.append(text)
    return "; ".join(parts)
