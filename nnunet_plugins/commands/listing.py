"""``nnunet-plugins list``: the methods, trainers, networks and planners this package provides."""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="list the methods, trainers, networks and planners provided")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--check", action="store_true",
                   help="also import every entry and report the ones that fail (exit 1 if any)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_plugins.registry import METHODS, resolve

    failures = []
    if args.check:
        for method in METHODS.values():
            for dotted in method.trainers + method.networks + method.planners:
                try:
                    resolve(dotted)
                except Exception as e:  # report every broken entry, not just the first
                    failures.append(f"{dotted}: {type(e).__name__}: {e}")
    if args.json:
        rows = [{"name": m.name, "paper": m.paper, "summary": m.summary, "dimensions": list(m.dimensions),
                 "trainers": [t.rpartition(".")[2] for t in m.trainers], "networks": list(m.networks),
                 "planners": list(m.planners)} for m in METHODS.values()]
        print(json.dumps({"methods": rows, "failures": failures}, indent=2))
    else:
        for m in METHODS.values():
            print(f"{m.name}  ({'/'.join(m.dimensions)})  {m.summary}")
            print(f"    paper:    {m.paper}")
            print(f"    trainers: {', '.join(t.rpartition('.')[2] for t in m.trainers) or '-'}"
                  f"   (nnUNetv2_train DATASET CONFIG FOLD -tr NAME)")
            print(f"    networks: {', '.join(m.networks) or '-'}")
            print(f"    planners: {', '.join(m.planners) or '-'}")
        for f in failures:
            print(f"BROKEN {f}")
    return 1 if failures else 0
