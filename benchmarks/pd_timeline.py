"""Where a PD request's decode TTFT goes: the decode engine's timeline of one request, against the same prompt
with its KV local (real CPU engines, NIXL).

`pd_transfer_share.py` measures the share of the decode TTFT spent on the transfer end to end; this says
where it sits. The decode engine runs under `pd_timeline_engine.py`, which timestamps the scheduler's and
connector's steps of each request (no engine change), and each round sends: a prefill leg and the PD request
(its KV READ from the prefill engine), the same prompt again (KV local), and, after another prefill leg, a
third time (the idle control: the decode engine idle while the prefill engine computed, as before a PD request,
with no transfer). Printed per kind, medians in ms after the request reached the decode engine's scheduler:
its fetch (params checked), blocks allocated, first layer landed, forward pass start and end, READ end (the
claim answered), first token; and the forward pass's wall time split into the engine thread's CPU time and its
time runnable but waiting for a core (schedstat). The rows PD - local and PD - idle control are the transfer's
cost by phase: before the forward pass (fetch, first layer, wake-up), inside it (a slower forward pass), after it
(the READ's end and claim).

    PYTHONPATH=src python benchmarks/pd_timeline.py --requests 30
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from pd_transfer_share import decode_blocks, decoded, prefill_leg, prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.procs import inferstack_env, start_inferstack

POINTS = {"pulled": "pull1", "allocated": "accept0", "first layer": "landed", "forward start": "sched",
          "READ end": "read1", "forward end": "fwd", "first token": "upd1"}


def run(decode_args: list[str], args: argparse.Namespace, trace: Path) -> None:
    base = ["engine", "serve", "--model", "smollm2-135m", "--dtype", "float32", "--threads", "1",
            "--kv-cache-dtype", "float32", "--kv-transport", "nixl"]
    env = inferstack_env(PD_TIMELINE_FILE=str(trace))
    env["PYTHONPATH"] = f"{Path(__file__).resolve().parent}:{env['PYTHONPATH']}"
    prefill = start_inferstack([*base, "--role", "prefill"])
    decode = start_inferstack([*base, "--role", "decode", "--kv-transfer-peers", "127.0.0.1", "--num-kv-blocks",
                               str(decode_blocks(args.tokens)), *decode_args], env=env, module="pd_timeline_engine")
    try:
        for k in range(args.requests + args.prompts):       # each prompt's first round is a warm-up
            text = prompt(k % args.prompts, args.tokens)
            params = prefill_leg(prefill.url, text, {"do_remote_decode": True})["kv_transfer_params"]
            for kind, request_params in (("pd", params), ("local", None)):
                mark(trace, kind if k >= args.prompts else "warm-up")
                decoded(decode.url, text, request_params)
            prefill_leg(prefill.url, text, None)
            mark(trace, "idle" if k >= args.prompts else "warm-up")
            decoded(decode.url, text, None)
    finally:
        prefill.stop()
        decode.stop()


def mark(trace: Path, kind: str) -> None:
    with trace.open("a") as f:
        f.write(json.dumps(["client", kind]) + "\n")


def requests(trace: Path) -> dict[str, list[dict[str, float]]]:
    """Per kind, each request's points (ms after its ``add``) and its forward pass's CPU and queued ms."""
    out: dict[str, list[dict[str, float]]] = {"pd": [], "local": [], "idle": []}
    kind, current, start, stat0 = None, None, 0.0, None
    for line in trace.read_text().splitlines():
        name, *rest = json.loads(line)
        if name == "client":
            kind, current = rest[0], None
            continue
        t = rest[0]
        if name == "add0" and kind in out:
            current, start = {}, t
            out[kind].append(current)
            continue
        if current is None:
            continue
        key = {"landed": "landed", "finish0": "fwd", "fwd_end": "fwd"}.get(name, name)
        if key in current:
            continue
        current[key] = (t - start) * 1e3
        if name == "sched":
            stat0 = rest[2]
        elif key == "fwd" and stat0 is not None:
            current["forward CPU"] = (rest[2][0] - stat0[0]) * 1e3
            current["forward waited for a core"] = (rest[2][1] - stat0[1]) * 1e3
    return out


def median(rows: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def report(label: str, kinds: dict[str, list[dict[str, float]]]) -> None:
    cols = [*POINTS, "forward CPU", "forward waited for a core"]
    print(f"\n{label}: medians, ms after the request reached the decode scheduler "
          f"({', '.join(f'{k} {len(v)}' for k, v in kinds.items())} requests)")
    print("| kind | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    meds = {kind: {c: median(rows, POINTS.get(c, c)) for c in cols} for kind, rows in kinds.items()}
    for kind, m in meds.items():
        print(f"| {kind} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in m.values()) + " |")
    for other in ("local", "idle"):
        pd, base = meds["pd"], meds[other]
        parts = {"before the forward pass": (pd["forward start"], base["forward start"]),
                 "forward pass": (_span(pd), _span(base)),
                 "after it": (_after(pd), _after(base)),
                 "first token": (pd["first token"], base["first token"])}
        print(f"  PD - {other}: " + ", ".join(f"{k} {a - b:+.1f} ms" for k, (a, b) in parts.items()
                                             if a is not None and b is not None))


def _span(m: dict[str, float | None]) -> float | None:
    return None if m["forward end"] is None or m["forward start"] is None else m["forward end"] - m["forward start"]


def _after(m: dict[str, float | None]) -> float | None:
    return None if m["first token"] is None or m["forward end"] is None else m["first token"] - m["forward end"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--decode-args", action="append",
                    help="the decode engine's extra options, one run each (repeat it for an A/B; default none)")
    args = ap.parse_args()
    for extra in args.decode_args or [""]:
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "timeline.jsonl"
            run(shlex.split(extra), args, trace)
            report(f"decode engine options: {extra or '(none)'}", requests(trace))


if __name__ == "__main__":
    main()
