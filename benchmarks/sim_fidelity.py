"""Fidelity of `inferstack sim` against emulated engines behind the real gateway.

For each routing profile: start N emulated engines (`engine serve --emulate PROFILE --emulate-count N`,
the real scheduler stepping in wall-clock time) behind `inferstack gateway serve` (that profile, an
audit log to learn where each request went), drive them with `inferstack bench run`, then simulate the
same fleet, workload, rate and seed with `inferstack sim run --tokenizer bundled`. Reported per
profile: median and p90 TTFT, TPOT and E2E of both and their relative error; the share of requests
the simulator routed to the same endpoint as the live gateway (matched by prompt digest); and the
engines' prefix-cache hit counters (/metrics) against the simulated engines' (the "canary").

    PYTHONPATH=src python benchmarks/sim_fidelity.py --profile l4:llama-3-8b --replicas 4 \
        --routing round-robin,cache-aware,default \
        --workload shared-prefix:groups=4,users=8,system=512,question=64,output=48 \
        --rate 2 --duration 60 --overhead-ms calibrate --out /tmp/sim-fidelity

Against real CPU engines (``--engines real``): N ``inferstack engine serve --model MODEL --threads 1``
processes (what ``inferstack up`` starts, one torch thread each, the default CPU batch cap) instead of
the emulated fleet, and the simulator on the `cpu` profile fitted just before on the steps that fleet
serves in a calibration run of its own (``--step-model served``, `calibrate_on_served_steps`, with the
co-location term and the host's speed drift: the engines share this machine's cores, so they are simulated on
one host, `sim.cores`; ``steady``: the same fit without the drift, the thirteenth stop's model; ``flat``: the
same steps at one price per shape, the twelfth stop's model; ``bare``: on ``inferstack engine calibrate``'s
steps of one engine alone; ``--hardware-file`` reuses a fitted one). ``--draws K`` simulates each step model on
K hosts of other names (other draws of the drift) and reports each figure's median over them.
The request overhead probe runs on emulated engines of that profile (the same HTTP/tokenization path,
step times exactly the model), so it does not absorb the step model's error. The command of the quiet
twelfth-stop numbers (docs/benchmarks.md):

    PYTHONPATH=src python benchmarks/sim_fidelity.py --engines real --replicas 2 --routing round-robin \
        --workload shared-prefix:groups=2,users=4,system=128,question=24,output=24 --rate 0.5 --duration 60 \
        --repeats 2 --overhead-ms calibrate --calibrate-s 30 --calibrate-rate 0.5 --step-model served,bare,live \
        --out /tmp/sim-fidelity-cpu

``--repeats N`` runs each live configuration N times: the live value is the median of the runs, and the
table shows the runs' own spread ((max - min) / median) next to the simulator's error, since a live
measurement cannot be matched more closely than it repeats.

``--overhead-ms calibrate`` first measures the live host's per-request time outside the step model on a
low-load probe run (`calibrate_overhead_ms`) and gives it to every simulation as --request-overhead-ms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import replace
from pathlib import Path

from gateway_common import Stack, env, start_emulated_fleet, start_inferstack_gateway, start_ready_file

from inferstack.bench.workloads import parse_workload
from inferstack.gateway.requests import prompt_parts
from inferstack.sim.calibrate import fit_served_steps, served_step_samples
from inferstack.sim.hardware import load_hardware_file, save_hardware_file
from inferstack.sim.models import get_model
from inferstack.sim.perf_model import DecodePricing
from inferstack.sim.runner import SimArgs, run_simulation
from inferstack.telemetry import promtext

METRICS = ("ttft", "tpot", "e2e")


def _engine_counters(url: str) -> tuple[float, float, float]:
    """(prefix-cache hit tokens, sum and count of the engine's own TTFT histogram) from /metrics."""
    scrape = promtext.parse(urllib.request.urlopen(url + "/metrics", timeout=10).read().decode(), 0.0)
    return tuple(sum(scrape.select(name).values()) for name in  # type: ignore[return-value]
                 ("vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_sum",
                  "vllm:time_to_first_token_seconds_count"))


def _prompt_digest(messages: list[tuple[str, str]]) -> str:
    """What the gateway's audit log records for a chat request (`server.py`: prompt_parts joined)."""
    body = {"messages": [{"role": r, "content": c} for r, c in messages]}
    return hashlib.sha256("\n".join(prompt_parts("chat", body)).encode()).hexdigest()


def _unit_digests(workload: str, seed: int, n: int) -> list[str]:
    units = parse_workload(workload).units(seed)
    return [_prompt_digest(next(units).stages[0][0].messages) for _ in range(n)]


def start_real_fleet(model: str, n: int, step_logs: Path) -> Stack:
    """N real engines, one process and one torch thread each, as `inferstack up` starts them; each writes
    its step log to ``step_logs/engine{i}-steps.jsonl``."""
    one = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    parts = []
    try:
        for i in range(n):
            parts.append(start_ready_file(f"engine{i}", [sys.executable, "-m", "inferstack", "engine", "serve",
                                                          "--model", model, "--threads", "1", "--port", "0",
                                                          "--step-log", str(step_logs / f"engine{i}-steps.jsonl")],
                                          timeout=300, extra_env=one))
    except BaseException:
        for p in parts:
            p.stop()
        raise
    return Stack("real", parts[0].url, parts, {"urls": [p.url for p in parts]})


def live_run(a: argparse.Namespace, routing: str, out: Path) -> tuple[dict, dict[str, list[int]], float]:
    """(bench results.json, prompt digest -> endpoint index of each of its requests in completion
    order, engines' prefix hits)."""
    out.mkdir(parents=True, exist_ok=True)
    engines = (start_real_fleet(a.model, a.replicas, out) if a.engines == "real"
               else start_emulated_fleet(a.profile, a.replicas))
    urls = engines.extra["urls"]
    audit = Path(tempfile.mkdtemp(prefix="sim-fidelity-audit-"))
    try:
        gw = start_inferstack_gateway({"pools": {"emu": {"endpoints": urls, "routing": routing}},
                                       "audit": {"directory": str(audit)}})
        try:
            subprocess.run([sys.executable, "-m", "inferstack", "bench", "run", "--target", gw.url,
                            "--workload", a.workload, "--rate", str(a.rate), "--duration", str(a.duration),
                            "--seed", str(a.seed), "--out", str(out), "--no-progress", "--no-plots"],
                           check=True, env=env(), stdout=subprocess.DEVNULL)
        finally:
            gw.stop()
        counters = [_engine_counters(u) for u in urls]
    finally:
        engines.stop()
    index = {u.split("//", 1)[1]: i for i, u in enumerate(urls)}
    where: dict[str, list[int]] = {}
    for path in sorted(audit.glob("audit*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("type") == "request" and rec.get("endpoint") in index and "prompt_sha256" in rec:
                where.setdefault(rec["prompt_sha256"], []).append(index[rec["endpoint"]])
    res = json.loads((out / "results.json").read_text())
    # the engines' own mean TTFT (arrival at the engine to first token): what the live TTFT is without
    # the host path in front of the engine
    res["engine_ttft_mean_s"] = sum(c[1] for c in counters) / max(1.0, sum(c[2] for c in counters))
    return res, where, sum(c[0] for c in counters)


def sim_run(a: argparse.Namespace, routing: str, out: Path, host: str = "local") -> tuple[dict, dict[int, int], float]:
    """(sim results.json, unit -> endpoint index, simulated prefix hits)."""
    # real engines share this machine's cores: simulated on one host, each step slowed while the other steps
    # (the host's name seeds its speed drift: `sim.cores.HostSpeed`)
    host = f"@{host}" if a.engines == "real" else ""
    run_simulation(SimArgs(fleet=[f"{a.profile}={a.replicas}{host}"], workload=a.workload, routing=routing,
                           duration=a.duration, rate=a.rate, seed=a.seed, tokenizer="bundled",
                           request_overhead_ms=a.overhead_ms,
                           request_overhead_samples_ms=tuple(a.overhead_samples_ms)), out,
                   progress=False, plots=False)
    res = json.loads((out / "results.json").read_text())
    where: dict[int, int] = {}
    import csv
    with (out / "requests.csv").open() as f:
        for row in csv.DictReader(f):
            if row["status"] == "ok":
                where[int(row["unit"])] = int(row["target"].rsplit("-", 1)[1])
    return res, where, float(res["server"]["prefix_cache_hits"])


def calibrate_overheads_ms(a: argparse.Namespace) -> list[float]:
    """The live host's time per request that step times do not model (HTTP hops through the gateway,
    parsing, chat template, tokenization), measured on a probe run of its own before the comparisons:
    the same fleet and workload at a light load (``--calibrate-rate``), live minus simulated TTFT of each
    request (matched by send order). A calibration of this machine, not a model of the host."""
    probe = argparse.Namespace(**{**vars(a), "rate": a.calibrate_rate, "duration": a.calibrate_s,
                                  "overhead_ms": 0.0, "overhead_samples_ms": (), "engines": "emulated"})
    live, _, _ = live_run(probe, "round-robin", a.out / "calibrate-live")
    sim, _, _ = sim_run(probe, "round-robin", a.out / "calibrate-sim")
    sim_ttft = {r["index"]: r["ttft_s"] for r in sim["requests"] if r["status"] == "ok"}
    return sorted(max(0.0, (r["ttft_s"] - sim_ttft[r["index"]]) * 1e3) for r in live["requests"]
                  if r["status"] == "ok" and r["index"] in sim_ttft)


def compare(a: argparse.Namespace, routing: str) -> list[dict[str, object]]:
    """One row per step model (``a.profiles``), each simulated against the same live runs."""
    runs = []
    for k in range(a.repeats):
        load = os.getloadavg()[0]
        runs.append((*live_run(a, routing, a.out / f"live-{routing}-{k}"), load))
    profiles = list(a.profiles)
    if a.engines == "real" and "live" in a.step_model.split(","):
        # in sample: fitted on the compared runs' own steps, so only the model's structure is judged
        hw, _ = fit_served_steps(a.model, sorted(a.out.glob(f"live-{routing}-*/engine*-steps.jsonl")),
                                 colocation="served" in a.step_model.split(","))
        save_hardware_file(hw, a.out / f"cpu-live-{routing}.json")
        profiles.append(("live", f"{a.out / f'cpu-live-{routing}.json'}:{a.model}"))
    rows = []
    for name, profile in profiles:
        label = routing if len(profiles) == 1 else f"{routing} ({name} steps)"
        out = a.out / f"sim-{routing}" if len(profiles) == 1 else a.out / f"sim-{routing}-{name}"
        pa = argparse.Namespace(**{**vars(a), "profile": profile})
        if a.draws > 1 and a.engines == "real":
            sims = [sim_run(pa, routing, out / f"local{i}", f"local{i}") for i in range(a.draws)]
            rows.append(compare_row(a, label, runs, median_draw([r[0] for r in sims]), *sims[0][1:]))
        else:
            rows.append(compare_row(a, label, runs, *sim_run(pa, routing, out)))
    return rows


def median_draw(results: list[dict]) -> dict:
    """The first draw's results with each latency figure replaced by its median over the draws (hosts of other
    names: other draws of the host's speed drift, the same requests and routing) and the draws' values kept."""
    first = json.loads(json.dumps(results[0]))
    for m in METRICS:
        for p in ("p50", "p90"):
            values = [r["summary"]["latency_s"][m][p] for r in results]
            first["summary"]["latency_s"][m][p] = statistics.median(values)
            first.setdefault("draws", {})[f"{m}_{p}"] = values
    return first


def compare_row(a: argparse.Namespace, routing: str, runs: list, sim: dict, sim_where: dict[int, int],
                sim_hits: float) -> dict[str, object]:
    live, live_where, live_hits, _ = runs[0]
    row: dict[str, object] = {"routing": routing, "requests_live": live["summary"]["requests"]["completed"],
                              "requests_sim": sim["summary"]["requests"]["completed"],
                              "load_avg_1m": [round(r[3], 2) for r in runs]}
    for m in METRICS:
        for p in ("p50", "p90"):
            values = [r[0]["summary"]["latency_s"][m][p] for r in runs]
            lv, sv = statistics.median(values), sim["summary"]["latency_s"][m][p]
            row[f"{m}_{p}_live_ms"], row[f"{m}_{p}_sim_ms"] = lv * 1e3, sv * 1e3
            row[f"{m}_{p}_err"] = (sv - lv) / lv
            row[f"{m}_{p}_live_runs_ms"] = [v * 1e3 for v in values]
            row[f"{m}_{p}_spread"] = (max(values) - min(values)) / lv
            if "draws" in sim:
                row[f"{m}_{p}_sim_draws_ms"] = [v * 1e3 for v in sim["draws"][f"{m}_{p}"]]
    row["ttft_gap_ms"] = ttft_gap(live, sim)
    if a.engines == "real":
        row["live_busy_share"] = busy_share(sorted(a.out.glob(f"live-{routing.split()[0]}-0/engine*-steps.jsonl")))
    ok = [r["ttft_s"] for r in live["requests"] if r["status"] == "ok"]
    row["live_ttft_mean_ms"] = statistics.fmean(ok) * 1e3 if ok else None
    row["live_engine_ttft_mean_ms"] = live["engine_ttft_mean_s"] * 1e3
    sim_ok = [r["ttft_s"] for r in sim["requests"] if r["status"] == "ok"]
    row["sim_ttft_mean_ms"] = statistics.fmean(sim_ok) * 1e3 if sim_ok else None
    # a prompt that repeats (shared-prefix cycles through its users) is matched occurrence by occurrence:
    # repeats are far apart in time, so completion order is send order
    digests = _unit_digests(a.workload, a.seed, max(sim_where, default=-1) + 1)
    seen: dict[str, int] = {}
    both = []
    for u in sorted(sim_where):
        k = seen[digests[u]] = seen.get(digests[u], -1) + 1
        live_eps = live_where.get(digests[u], [])
        if k < len(live_eps):
            both.append((live_eps[k], sim_where[u]))
    row["routing_compared"] = len(both)
    row["routing_same"] = sum(x == y for x, y in both) / len(both) if both else None
    row["routing_same_partition"] = _same_partition(both)
    row["prefix_hits_live"], row["prefix_hits_sim"] = live_hits, sim_hits
    return row


def ttft_gap(live: dict, sim: dict) -> dict[str, float]:
    """Where live and simulated TTFT part, request by request (matched by send order): the gap's median
    and p90, and its median for requests sent while few vs many others were in flight at the live
    gateway (split at the median in-flight count). A gap that grows with in-flight requests is host
    work that scales with concurrency, which a constant request overhead cannot model."""
    sim_ttft = {r["index"]: r["ttft_s"] for r in sim["requests"] if r["status"] == "ok"}
    ok = [r for r in live["requests"] if r["status"] == "ok" and r["index"] in sim_ttft]
    if len(ok) < 4:
        return {}
    spans = [(r["sent_s"], r["end_s"]) for r in ok]
    rows = sorted((sum(a < r["sent_s"] < b for a, b in spans), (r["ttft_s"] - sim_ttft[r["index"]]) * 1e3)
                  for r in ok)
    gaps = sorted(g for _, g in rows)
    cut = statistics.median(n for n, _ in rows)
    low = [g for n, g in rows if n <= cut] or [0.0]
    high = [g for n, g in rows if n > cut] or [0.0]
    return {"p50": statistics.median(gaps), "p90": gaps[int(0.9 * (len(gaps) - 1))], "inflight_cut": cut,
            "low_inflight_p50": statistics.median(low), "high_inflight_p50": statistics.median(high)}


def _same_partition(pairs: list[tuple[int, int]]) -> float | None:
    """Share of requests that agree under the best one-to-one relabelling of endpoints: a profile that
    breaks ties at random (default, gie) picks *which* endpoint holds a prefix by chance, but should
    still group the same requests together."""
    if not pairs:
        return None
    counts: dict[tuple[int, int], int] = {}
    for p in pairs:
        counts[p] = counts.get(p, 0) + 1
    used_live, used_sim, agree = set(), set(), 0
    for (lv, sv), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        if lv not in used_live and sv not in used_sim:
            used_live.add(lv)
            used_sim.add(sv)
            agree += n
    return agree / len(pairs)


def table(rows: list[dict[str, object]]) -> str:
    head = ["routing", "n live/sim", *[f"{m.upper()} {p} live/sim ms (err)" for m in METRICS for p in ("p50", "p90")],
            "same endpoint (same grouping)", "prefix hits live/sim", "load avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["routing"]), f"{r['requests_live']}/{r['requests_sim']}"]
        cells += [f"{r[f'{m}_{p}_live_ms']:.1f}/{r[f'{m}_{p}_sim_ms']:.1f} ({r[f'{m}_{p}_err']:+.1%}"
                  + (f"; live ±{r[f'{m}_{p}_spread']:.1%})" if len(r["load_avg_1m"]) > 1 else ")")  # type: ignore
                  for m in METRICS for p in ("p50", "p90")]
        same = r["routing_same"]
        cells += ["–" if same is None else f"{same:.1%} ({r['routing_same_partition']:.1%}) of {r['routing_compared']}",
                  f"{r['prefix_hits_live']:.0f}/{r['prefix_hits_sim']:.0f}",
                  "/".join(f"{x:.1f}" for x in r["load_avg_1m"])]  # type: ignore[attr-defined]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def calibrate_cpu_profile(a: argparse.Namespace, kind: str) -> tuple[Path, str]:
    """(the `cpu` hardware file to simulate with, a line saying where it came from): ``--hardware-file``;
    or `inferstack engine calibrate` run now (``bare``: one engine alone, bare forward passes, one torch
    thread); or the steps the fleet serves (``served``, `calibrate_on_served_steps`)."""
    if a.hardware_file is not None:
        return a.hardware_file, f"step model from {a.hardware_file}"
    if kind == "served":
        return calibrate_on_served_steps(a)
    if kind == "flat":
        return a.out / "cpu-flat.json", "flat: the same served steps, one price per shape whatever the neighbours do"
    if kind == "steady":
        return a.out / "cpu-steady.json", "steady: the served fit without the host's speed drift"
    out = a.out / "cpu-bare.json"
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-m", "inferstack", "engine", "calibrate", "--model", a.model,
                           "--threads", "1", "--out", str(out), "--samples-out", str(a.out / "cpu-steps.jsonl")],
                          check=True, env={**env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    return out, f"bare step model calibrated now (load avg {load:.1f}): {done.stdout.strip()}"


def neighbour_ratios(logs: list[Path], hw_file: Path, model: str) -> dict[str, float]:
    """How much a served step costs while another engine on the same cores is stepping against while none
    is: each step's served time over the fitted model's price for its shape, median of the steps that
    overlap other engines' steps for more than 80 % of their time, and of those that overlap less than
    20 %, against ``hw_file``'s prices (the flat fit: one price per shape, whatever the neighbours do; the
    served profile's `colocation_slowdown` is what this ratio looks like as a model term)."""
    pricing = DecodePricing(get_model(model), load_hardware_file(hw_file))
    starts = {p: [json.loads(line)["start"] for line in p.read_text().splitlines()] for p in logs}
    steps = {p: list(zip(starts[p], served_step_samples(p, skip=0), strict=True)) for p in logs}
    alone, together = [], []
    for p in logs:
        others = [(t, t + s.seconds) for q in logs if q != p for t, s in steps[q]]
        for t, s in steps[p][2:]:
            shared = sum(max(0.0, min(t + s.seconds, b) - max(t, a)) for a, b in others) / s.seconds
            ratio = s.seconds / pricing.step_time([(w.context, w.new_tokens, w.samples) for w in s.work])
            (alone if shared < 0.2 else together if shared > 0.8 else []).append(ratio)
    med = statistics.median
    return {"alone": med(alone) if alone else float("nan"), "alone_n": len(alone),
            "together": med(together) if together else float("nan"), "together_n": len(together)}


def busy_share(logs: list[Path]) -> float:
    """Mean share of the time between its first and last step that an engine spent stepping (served
    steps): near 1 the fleet runs near saturation, where a few % of step time move latencies by far more."""
    shares = []
    for p in logs:
        starts = [json.loads(line)["start"] for line in p.read_text().splitlines()]
        steps = served_step_samples(p, skip=0)
        if len(steps) > 1:
            shares.append(sum(s.seconds for s in steps) / (starts[-1] + steps[-1].seconds - starts[0]))
    return statistics.fmean(shares) if shares else float("nan")


def calibrate_on_served_steps(a: argparse.Namespace) -> tuple[Path, str]:
    """Fit the `cpu` profile on what the real engines spend per step *while serving*: the same fleet (N
    engines, one torch thread each, side by side), gateway, workload and rate as the comparison, for
    ``--calibrate-served-s`` seconds on another seed (``--seed`` + 1000, so the comparison's own requests
    are not fitted), each engine logging its steps (`engine serve --step-log`). Every step is priced start
    to next start (`served_step_samples`): the forward pass slowed by its neighbours on the shared cores,
    plus the serving loop's host work."""
    first = a.routing.split(",")[0]
    run = argparse.Namespace(**{**vars(a), "seed": a.seed + 1000, "duration": a.calibrate_served_s})
    load = os.getloadavg()[0]
    live_run(run, first, a.out / "calibrate-served")
    logs = sorted((a.out / "calibrate-served").glob("engine*-steps.jsonl"))
    hw, report = fit_served_steps(a.model, logs)
    out = a.out / "cpu-served.json"
    save_hardware_file(hw, out)
    save_hardware_file(fit_served_steps(a.model, logs, colocation=False)[0], a.out / "cpu-flat.json")
    save_hardware_file(replace(hw, speed_jitter=0.0, speed_jitter_corr=0.0), a.out / "cpu-steady.json")
    co = neighbour_ratios(logs, a.out / "cpu-flat.json", a.model)
    return out, (f"served step model fitted on {report['steps']} served steps ({a.replicas} engines, {first}, seed "
                 f"{run.seed}, {run.duration:.0f} s, load avg {load:.1f}): median step-time error "
                 f"{report['median_rel_error']:.1%} (p90 {report['p90_rel_error']:.1%}), co-location slowdown c = "
                 f"{hw.colocation_slowdown:.3f} (another engine stepped during {report['shared_share']:.0%} of the "
                 f"step time), host speed drift sigma {hw.speed_jitter:.3f} per {hw.speed_jitter_s:.0f} s "
                 f"(consecutive windows correlated {hw.speed_jitter_corr:.2f}); flat fit's served ÷ fitted step "
                 f"{co['alone']:.2f} while the other engines were idle "
                 f"({co['alone_n']} steps), {co['together']:.2f} while they stepped too ({co['together_n']})")


def step_models(a: argparse.Namespace, ap: argparse.ArgumentParser) -> list[str]:
    """The profiles to fit before the live runs (``--step-model`` less ``live``, which is fitted after)."""
    kinds = a.step_model.split(",")
    if not set(kinds) <= {"served", "steady", "flat", "bare", "live"} or kinds[0] in ("live", "flat", "steady") \
            or (bool({"flat", "steady"} & set(kinds)) and "served" not in kinds):
        ap.error(f"--step-model: served (then optionally steady, flat) and/or bare, then optionally live; "
                 f"got {a.step_model!r}")
    return [k for k in kinds if k != "live"][:1 if a.hardware_file is not None else None]


def request_overhead(a: argparse.Namespace) -> str:
    """Sets ``a.overhead_ms`` (and ``a.overhead_samples_ms``) from ``--overhead-ms``; returns what it did."""
    mode, a.overhead_samples_ms = a.overhead_ms, []
    if mode not in ("calibrate", "calibrate-dist"):
        a.overhead_ms = float(mode)
        return f"request overhead {a.overhead_ms:.1f} ms (given)"
    samples = calibrate_overheads_ms(a)
    a.overhead_ms = statistics.median(samples)
    if mode == "calibrate-dist":
        a.overhead_samples_ms = samples
    return (f"request overhead calibrated on {len(samples)} probe requests: median {a.overhead_ms:.1f} ms, "
            f"p90 {samples[int(0.9 * (len(samples) - 1))]:.1f} ms; simulated with "
            f"{'each request drawing one' if mode == 'calibrate-dist' else 'the median'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", choices=("emulated", "real"), default="emulated",
                    help="live side: emulated engines of --profile, or real CPU engines of --model")
    ap.add_argument("--profile", default="l4:llama-3-8b", help="emulation profile (--engines emulated)")
    ap.add_argument("--model", default="smollm2-135m", help="real engines' model (--engines real)")
    ap.add_argument("--hardware-file", type=Path, default=None,
                    help="--engines real: a fitted cpu profile to use instead of fitting one now "
                         "(--step-model; OUT/cpu-served.json, OUT/cpu-bare.json)")
    ap.add_argument("--step-model", default="served",
                    help="--engines real without --hardware-file: fit the cpu profile on the steps the fleet "
                         "serves in a calibration run (served: with the co-location slowdown, the engines "
                         "simulated on one shared host, its speed drifting as fitted; 'served,steady' adds the same "
                         "fit without the drift; 'served,flat' adds the same steps fitted at one price per "
                         "shape, without it) or on `inferstack engine calibrate`'s bare steps "
                         "(bare); 'served,bare' simulates both against the same live runs (the overhead probe "
                         "uses the bare profile, or the catalog cpu one); 'live' adds a profile fitted on the "
                         "compared live runs' own steps (in sample: judges the model's structure, not its "
                         "prediction)")
    ap.add_argument("--calibrate-served-s", type=float, default=60.0,
                    help="seconds of the served calibration run (--step-model served)")
    ap.add_argument("--repeats", type=int, default=1, help="live runs per routing profile (spread reported)")
    ap.add_argument("--draws", type=int, default=1,
                    help="--engines real: simulate each step model on K hosts (local0..): K draws of the host's "
                         "speed drift; the table shows each figure's median over the draws")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--routing", default="round-robin,cache-aware,default")
    ap.add_argument("--workload", default="shared-prefix:groups=4,users=8,system=512,question=64,output=48")
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--overhead-ms", default="0",
                    help="the simulator's --request-overhead-ms (0: step times only); 'calibrate': the median "
                         "of a light-load probe run's per-request overheads (calibrate_overheads_ms); "
                         "'calibrate-dist': each simulated request draws one of them (seeded)")
    ap.add_argument("--calibrate-s", type=float, default=40.0, help="seconds of the probe run")
    ap.add_argument("--calibrate-rate", type=float, default=1.0, help="requests per second of the probe run")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="sim-fidelity-")))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    calibration, a.profiles = "", [("", a.profile)]
    kinds = step_models(a, ap) if a.engines == "real" else []
    # bare first, then the overhead probe, then the served calibration run: right before the live runs it
    # prices, so the neighbours' load drifts as little as possible in between
    done = {k: calibrate_cpu_profile(a, k) for k in kinds if k not in ("served", "steady", "flat")}
    if kinds:
        a.profile = f"{next(iter(done.values()))[0]}:{a.model}" if done else f"cpu:{a.model}"
    note = request_overhead(a)
    if "served" in kinds:
        done["served"] = calibrate_cpu_profile(a, "served")
    for k in ("steady", "flat"):
        if k in kinds:
            done[k] = calibrate_cpu_profile(a, k)
    if kinds:
        a.profiles = [(k, f"{done[k][0]}:{a.model}") for k in kinds]
        a.profile = a.profiles[0][1]
        calibration = "; ".join(done[k][1] for k in kinds)
    rows = [row for r in a.routing.split(",") for row in compare(a, r)]
    (a.out / "fidelity.json").write_text(json.dumps({"engines": a.engines, "profile": a.profile,
                                                     "calibration": calibration, "overhead": note,
                                                     "overhead_samples_ms": a.overhead_samples_ms,
                                                     "rows": rows}, indent=1) + "\n")
    text = f"{a.engines} engines ×{a.replicas}, simulated as {a.profile}; {calibration}\n{note}\n\n" + table(rows)
    for r in rows:
        g = r["ttft_gap_ms"]
        if g:
            text += (f"\nTTFT live - sim ({r['routing']}): p50 {g['p50']:.1f} ms, p90 {g['p90']:.1f} ms; median for "
                     f"<= {g['inflight_cut']:.0f} in flight {g['low_inflight_p50']:.1f} ms, "
                     f"above {g['high_inflight_p50']:.1f} ms; live mean TTFT {r['live_ttft_mean_ms']:.1f} ms, "
                     f"of which inside the engines {r['live_engine_ttft_mean_ms']:.1f} ms; simulated mean "
                     f"{r['sim_ttft_mean_ms']:.1f} ms (overhead {a.overhead_ms:.1f} ms included)"
                     + (f"; live engines busy {r['live_busy_share']:.0%} of the time"
                        if "live_busy_share" in r else ""))
    (a.out / "fidelity.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
