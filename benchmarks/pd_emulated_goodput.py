"""Goodput of prefill/decode disaggregated (xPyD) vs colocated fleets of emulated H100 engines.

A DistServe-style comparison with the same number of engines in every fleet. Each fleet is real
software: `inferstack engine serve --emulate PROFILE` processes (the real scheduler, KV cache and PD
connector; step times and KV-transfer times from the performance model) behind `inferstack gateway
serve` — a plain pool for the colocated fleet, a PD pool for xPyD. `inferstack bench run` drives an
open-loop Poisson load at each rate of ``--rates``; every request's TTFT and TPOT are then checked
against each SLO of ``--slo``:

* attainment: the share of requests (sent inside the measurement window) meeting both limits;
* goodput: the highest rate whose attainment is at least ``--attainment`` (90 %, as DistServe),
  interpolated linearly between the last swept rate that meets it and the first that does not.

Fleets are named ``colo`` or ``XpYd`` (X prefill + Y decode engines), optionally ``+qN`` for
conditional disaggregation (`pd.max_prefill_queue: N`: prefill on the decode engine while every
prefill engine has N requests waiting) and ``@GBPS`` for the network line rate per device that KV
transfers get (default: the hardware's NIC, 400 Gb/s on h100).

    PYTHONPATH=src python benchmarks/pd_emulated_goodput.py            # the run in docs/benchmarks.md
    PYTHONPATH=src python benchmarks/pd_emulated_goodput.py --fleets colo,1p1d --engines 2 --rates 1,2

The emulator process prints how late its steps ended (host CPU falling behind the emulated
devices); the report lists it per fleet, since a late host makes every fleet look slower.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway_common import Proc, env, start_emulated_fleet, start_inferstack_gateway

DEFAULT_SLOS = ["tight-tpot:ttft=1s,tpot=25ms", "tight-ttft:ttft=400ms,tpot=100ms"]


@dataclass(frozen=True)
class Fleet:
    name: str
    prefill: int          # 0: colocated
    decode: int
    link_gbps: float | None = None
    max_prefill_queue: int | None = None

    @classmethod
    def parse(cls, text: str, engines: int) -> Fleet:
        m = re.fullmatch(r"(?:(colo)|(\d+)p(\d+)d)(?:\+q(\d+))?(?:@([\d.]+))?", text.strip().lower())
        if m is None:
            raise SystemExit(f"bad fleet {text!r}: use colo or XpYd, optionally +qN and @GBPS (e.g. 2p2d+q2@25)")
        if m.group(1):
            return cls(text, 0, engines)
        p, d = int(m.group(2)), int(m.group(3))
        if p + d != engines:
            raise SystemExit(f"fleet {text!r} has {p + d} engines; every fleet needs --engines {engines}")
        return cls(text, p, d, float(m.group(5)) if m.group(5) else None, int(m.group(4)) if m.group(4) else None)


@dataclass(frozen=True)
class SLO:
    name: str
    ttft_s: float
    tpot_s: float

    @classmethod
    def parse(cls, text: str) -> SLO:
        name, _, spec = text.partition(":")
        limits = dict(part.split("=", 1) for part in spec.split(","))
        return cls(name, _seconds(limits["ttft"]), _seconds(limits["tpot"]))


def _seconds(text: str) -> float:
    return float(text[:-2]) / 1e3 if text.endswith("ms") else float(text.rstrip("s"))


def start_fleet(fleet: Fleet, profile: str, engine_args: list[str]) -> tuple[list[Proc], Proc]:
    if fleet.prefill == 0:
        engines = [start_emulated_fleet(profile, fleet.decode, *engine_args)]
        endpoints: list = engines[0].extra["urls"]
        pool: dict = {"endpoints": endpoints}
    else:
        link = ["--emulate-kv-link-gbps", str(fleet.link_gbps)] if fleet.link_gbps else []
        peers = {"prefill": [], "decode": ["--kv-transfer-peers", "127.0.0.1"]}
        engines = [start_emulated_fleet(profile, n, "--role", role, *peers[role], *link, *engine_args)
                   for role, n in (("prefill", fleet.prefill), ("decode", fleet.decode))]
        endpoints = [{"url": u, "role": role, "name": f"{role}-{i}"}
                     for proc, role in zip(engines, ("prefill", "decode"), strict=True)
                     for i, u in enumerate(proc.extra["urls"])]
        pool = {"endpoints": endpoints, "pd": {"threshold_tokens": 128, "max_prefill_queue": fleet.max_prefill_queue}}
    gateway = start_inferstack_gateway({"pools": {"fleet": pool}})
    return engines, gateway


def emulator_lag(proc: Proc) -> dict:
    """The emulator's exit line: steps that ended late because the host was busy."""
    for line in reversed(proc.log.read_text(errors="replace").splitlines()):
        if line.startswith('{"emulator"'):
            stats = json.loads(line)["stats"]
            steps = sum(s["steps"] for s in stats)
            return {"steps": steps, "late_share": sum(s["late_steps"] for s in stats) / max(steps, 1),
                    "lag_p99_ms": max(s["lag_p99_ms"] for s in stats)}
    return {}


def run_rate(gateway: str, workload: str, rate: float, seed: int, args: argparse.Namespace, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "inferstack", "bench", "run", "--target", gateway, "--workload", workload,
           "--rate", str(rate), "--duration", str(args.duration), "--warmup", str(args.warmup),
           "--seed", str(seed), "--out", str(out), "--no-plots", "--no-progress"]
    subprocess.run(cmd, check=True, env=env(), stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["requests"]


def summarize(rows: list[dict], slos: list[SLO], duration: float) -> dict:
    inc = [r for r in rows if r["included"]]
    ok = [r for r in inc if r["status"] == "ok" and r["ttft_s"] is not None and r["tpot_s"] is not None]

    def pct(key: str, q: float) -> float | None:
        vals = sorted(r[key] for r in ok)
        return vals[min(len(vals) - 1, int(q * len(vals)))] if vals else None

    out = {"sent": len(inc), "ok": len(ok), "failed": len(inc) - len(ok),
           "ttft_p50_s": pct("ttft_s", 0.5), "ttft_p90_s": pct("ttft_s", 0.9),
           "tpot_p50_s": pct("tpot_s", 0.5), "tpot_p90_s": pct("tpot_s", 0.9),
           "output_tokens_per_s": sum(r["output_tokens"] for r in ok) / duration, "attainment": {}}
    for slo in slos:
        good = sum(1 for r in ok if r["ttft_s"] <= slo.ttft_s and r["tpot_s"] <= slo.tpot_s)
        out["attainment"][slo.name] = good / len(inc) if inc else 0.0
    return out


def goodput(points: list[tuple[float, float]], target: float) -> float:
    """Highest rate with attainment >= target, interpolated towards the first rate that misses it."""
    best = 0.0
    prev: tuple[float, float] | None = None
    for rate, att in sorted(points):
        if att >= target:
            best, prev = rate, (rate, att)
            continue
        if prev is not None:
            r0, a0 = prev
            best = r0 + (rate - r0) * (a0 - target) / (a0 - att)
        break
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="h100x4:llama-3-70b", help="emulated engine: HARDWARE[xTP]:MODEL")
    ap.add_argument("--engines", type=int, default=4, help="engines in every fleet")
    ap.add_argument("--fleets", default="colo,2p2d,1p3d,3p1d,2p2d@25")
    ap.add_argument("--workload", default="synthetic:input=uniform(1024,3072),output=uniform(64,192)")
    ap.add_argument("--rates", default="4,8,12,16,20,24", help="requests/s for the whole fleet")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo", action="append", help=f"NAME:ttft=..,tpot=.. (repeat; default {DEFAULT_SLOS})")
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--engine-args", default="", help="extra `engine serve` flags for every engine")
    ap.add_argument("--out", type=Path, default=None, help="where results.json goes (default: a temp dir)")
    args = ap.parse_args()

    fleets = [Fleet.parse(f, args.engines) for f in args.fleets.split(",")]
    slos = [SLO.parse(s) for s in (args.slo or DEFAULT_SLOS)]
    rates = [float(r) for r in args.rates.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="pd-goodput-"))
    window = args.duration - args.warmup
    results: dict = {"profile": args.profile, "workload": args.workload, "engines": args.engines,
                     "slos": [vars(s) for s in slos], "attainment_target": args.attainment, "fleets": {}}
    for fleet in fleets:
        engines, gateway = start_fleet(fleet, args.profile, args.engine_args.split())
        per_rate = {}
        try:
            for i, rate in enumerate(rates):
                # A fresh seed per rate: the fleet keeps running, and prompts of an earlier rate would be
                # prefix-cache hits. Every fleet sees the same prompts and arrival times at a given rate.
                rows = run_rate(gateway.url, args.workload, rate, args.seed * 1000 + i, args,
                                out / fleet.name / f"rate-{rate:g}")
                per_rate[rate] = summarize(rows, slos, window)
                s = per_rate[rate]
                print(f"{fleet.name:>9} {rate:5.1f} req/s: TTFT p90 {s['ttft_p90_s'] or 0:.3f} s, TPOT p90 "
                      f"{s['tpot_p90_s'] or 0:.4f} s, failed {s['failed']}, attainment "
                      + ", ".join(f"{k} {v:.0%}" for k, v in s["attainment"].items()), flush=True)
        finally:
            gateway.stop()
            for proc in engines:
                proc.stop()
        results["fleets"][fleet.name] = {
            "rates": per_rate, "lag": [emulator_lag(p) for p in engines],
            "goodput": {slo.name: goodput([(r, s["attainment"][slo.name]) for r, s in per_rate.items()],
                                          args.attainment) for slo in slos}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out / 'results.json'}\n")
    print(report(results, slos, fleets))


def report(results: dict, slos: list[SLO], fleets: list[Fleet]) -> str:
    base = results["fleets"].get("colo", {}).get("goodput", {})
    lines = [f"Goodput (req/s at ≥{results['attainment_target']:.0%} attainment), {results['engines']} engines "
             f"of {results['profile']}, workload {results['workload']}:", "",
             "| fleet | " + " | ".join(f"{s.name} (TTFT ≤ {s.ttft_s * 1e3:g} ms, TPOT ≤ {s.tpot_s * 1e3:g} ms)"
                                         for s in slos) + " | late emulator steps |",
             "|---|" + "---|" * (len(slos) + 1)]
    for fleet in fleets:
        f = results["fleets"][fleet.name]
        cells = []
        for s in slos:
            g = f["goodput"][s.name]
            ratio = f" ({g / base[s.name]:.2f}×)" if base.get(s.name) and fleet.name != "colo" else ""
            cells.append(f"{g:.2f}{ratio}")
        late = max((lag.get("late_share", 0.0) for lag in f["lag"]), default=0.0)
        lines.append(f"| {fleet.name} | " + " | ".join(cells) + f" | {late:.1%} |")
    lines += ["", "| fleet | rate | TTFT p50 / p90 (s) | TPOT p50 / p90 (ms) | out tok/s | failed | "
              + " | ".join(f"{s.name} attainment" for s in slos) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(slos)]
    for fleet in fleets:
        for rate, s in results["fleets"][fleet.name]["rates"].items():
            lines.append(f"| {fleet.name} | {rate:g} | {s['ttft_p50_s'] or 0:.3f} / {s['ttft_p90_s'] or 0:.3f} | "
                         f"{(s['tpot_p50_s'] or 0) * 1e3:.1f} / {(s['tpot_p90_s'] or 0) * 1e3:.1f} | "
                         f"{s['output_tokens_per_s']:.0f} | {s['failed']} | "
                         + " | ".join(f"{s['attainment'][x.name]:.0%}" for x in slos) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
