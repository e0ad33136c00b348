"""Where a fleet simulation's CPU goes, by event handler: process CPU time (`time.process_time`) around each
handler of `sim.simulation.Simulation` and the replica calls beneath them, for one `sim_scale.py` configuration.

Shares overlap (a handler's time includes the calls beneath it: `_route` includes the arrival's `_cut`, which
includes its `settle_through`, which includes a `settle`); the wrappers' own cost (~1-2 µs a call) is included.
Records are the same as without the wrappers (the hash is printed), so a run can be checked against sim_scale.py.

    PYTHONPATH=src python benchmarks/sim_handlers.py --replicas 1000 --requests 20000 --routing default
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sim_scale import one

from inferstack.sim.replica import SimReplica
from inferstack.sim.simulation import Simulation

HANDLERS = {Simulation: ("_arrival", "_route", "_cut", "_run_end", "_landed", "_step", "_finish"),
            SimReplica: ("settle", "settle_through", "begin_run", "begin_step", "end_step")}


def _timed(f: Callable[..., Any], name: str, cpu: Counter[str], calls: Counter[str]) -> Callable[..., Any]:
    clock = time.process_time

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = clock()
        try:
            return f(*args, **kwargs)
        finally:
            cpu[name] += clock() - t
            calls[name] += 1
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=1000)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--routing", default="default")
    p.add_argument("--rate-per-replica", type=float, default=5.0)
    p.add_argument("--workload", default="synthetic:input=1000,output=200")
    p.add_argument("--profile", default="h100:llama-3-8b")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--decode-run-steps", type=int, default=64)
    p.add_argument("--out", default="/tmp/sim-handlers")
    a = p.parse_args()
    a.python_routing = False
    cpu: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for cls, names in HANDLERS.items():
        for name in names:
            setattr(cls, name, _timed(getattr(cls, name), name, cpu, calls))
    row = one(a)
    print(json.dumps(row))
    total = row["cpu_s"]
    print("\n| handler / call | CPU s | share | calls | µs a call |\n|---|---:|---:|---:|---:|")
    for name, s in cpu.most_common():
        print(f"| `{name}` | {s:.2f} | {100 * s / total:.1f} % | {calls[name]:,} | {1e6 * s / calls[name]:.0f} |")


if __name__ == "__main__":
    main()
