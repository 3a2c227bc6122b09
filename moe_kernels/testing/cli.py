"""moe-check: `moe-check OP module:function [--adapter NAME] [--preset edge] [--device cpu]
[--seed 0] [--json PATH]` checks an implementation against moe_kernels' reference over a
preset's cases, prints a table (case, pass/fail, worst error, rule) and the failures'
details, and exits 1 on any failure (2 on a usage error): a CI step (docs/testing.md)."""

from __future__ import annotations

import argparse
import importlib
import sys

from moe_kernels.testing import core


def load(target: str):
    """'package.module:function' (or 'package.module:Class.method') -> the object."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected module:function, got {target!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target} is not callable")
    return obj


def parser() -> argparse.ArgumentParser:
    from moe_kernels.testing.adapters import ADAPTERS
    p = argparse.ArgumentParser(prog="moe-check", description=__doc__.split("\n\n")[0])
    p.add_argument("op", help=f"one of: {', '.join(core.ops())}")
    p.add_argument("impl", help="module:function, called with the op's arguments "
                                "(docs/api.md) or the adapter's convention")
    p.add_argument("--adapter", choices=sorted(ADAPTERS), help="another project's convention")
    p.add_argument("--preset", default="edge", choices=core.PRESETS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        impl = load(args.impl)
        report = core.check(args.op, impl, preset=args.preset, seed=args.seed,
                            device=args.device, adapter=args.adapter, raise_on_failure=False)
    except (ValueError, ImportError, AttributeError) as exc:
        print(f"moe-check: {exc}", file=sys.stderr)
        return 2
    except AssertionError as exc:    # nothing could be checked
        print(f"moe-check: {exc}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.dumps())
    print(report.table())
    n, bad, skipped = len(report.results), len(report.failures), len(report.skipped)
    print(f"\n{args.op} ({args.impl}, preset {args.preset}, {args.device}): "
          f"{n - bad - skipped} passed, {bad} failed, {skipped} skipped")
    if bad:
        print("\n" + report.message())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
