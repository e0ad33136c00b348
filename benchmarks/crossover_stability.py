"""How steady the start-up kernel crossover is: ``measure_crossover`` again and again, as each start runs it.

    PYTHONPATH=src python benchmarks/crossover_stability.py [--threads 2] [--starts 8] [--shape 3072x576]

The engine measures it once per start on layer 0's gate/up weight (``quant_loader._crossovers``; SmolLM2-135M's
is 3072 x 576) for int4 and grouped int8. Here a random weight of that shape stands in (the kernels' time does
not depend on the values), and the crossover is measured ``--starts`` times per kind, the kinds alternating, so
load from other processes reaches both alike. Run it on two trees in turn (``PYTHONPATH=<tree>/src``) to
compare their measurement rules in the same minutes; a rule that holds under load prints one value per kind.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from inferstack.engine.models.quant_linear import measure_crossover
from inferstack.engine.weights.quantize import quantize_int4, quantize_int8_grouped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--starts", type=int, default=8)
    ap.add_argument("--shape", default="3072x576", help="N x K of the probe weight")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, k = (int(v) for v in args.shape.split("x"))
    dense = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05
    weights = {"int4": quantize_int4(dense, 32), "int8": quantize_int8_grouped(dense, 32)}
    found: dict[str, list[int | None]] = {kind: [] for kind in weights}
    spent = 0.0
    for _ in range(args.starts):
        for kind, w in weights.items():
            t = time.perf_counter()
            found[kind].append(measure_crossover(w))
            spent += time.perf_counter() - t
    print(f"{args.shape}, {args.threads} thread(s), {args.starts} starts, "
          f"{spent / (args.starts * len(weights)):.2f} s per measurement")
    for kind, values in found.items():
        counts = ", ".join(f"{rows}: {c}" for rows, c in sorted(Counter(values).items(), key=lambda kv: kv[0] or 1e9))
        print(f"{kind}: {values}  ({counts})")


if __name__ == "__main__":
    main()
