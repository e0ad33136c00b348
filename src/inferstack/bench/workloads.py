"""Workloads: what to send. A workload yields units; a unit is a sequence of stages run one after
another, and a stage is a set of requests sent together (an agent's parallel calls).

Spec syntax on the command line: `KIND[:key=value,...]`, e.g. `synthetic:input=512,output=128`,
`shared-prefix:groups=8,system=2048,users=16`, `trace:path=azure.csv`. A path to a `.jsonl`/`.csv`
file is shorthand for `trace:path=FILE`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inferstack.bench.distributions import LengthDist, parse_length
from inferstack.bench.textgen import keyed_words, word_indices, word_list, words

Message = tuple[str, str]   # (role, content)


@dataclass
class RequestSpec:
    messages: list[Message]
    input_tokens: int            # nominal (words); the server's usage gives the exact count
    output_tokens: int
    session: str | None = None
    group: str | None = None
    # the vocabulary indices of the words of a one-message request, when the workload drew them: the
    # simulator maps them to token ids without splitting the text (`sim.prompts.WordTokens`)
    word_ids: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class Unit:
    stages: list[list[RequestSpec]]
    at: float | None = None      # arrival offset in seconds (trace replay)
    think_s: float = 0.0         # pause between stages

    @property
    def num_requests(self) -> int:
        return sum(len(s) for s in self.stages)


@dataclass
class Workload:
    kind: str
    params: dict[str, str]
    units: Callable[[int], Iterator[Unit]]       # seed -> units (finite for traces)
    description: str
    finite: bool = False
    extra: dict[str, object] = field(default_factory=dict)


class WorkloadError(ValueError):
    pass


def _split_params(text: str) -> dict[str, str]:
    """key=value pairs split on commas outside parentheses."""
    out: dict[str, str] = {}
    depth, cur = 0, ""
    parts: list[str] = []
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in filter(None, (p.strip() for p in parts)):
        if "=" not in part:
            raise WorkloadError(f"workload parameter {part!r} is not key=value")
        k, v = part.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


class _Params:
    def __init__(self, kind: str, raw: dict[str, str], allowed: dict[str, str]) -> None:
        unknown = set(raw) - set(allowed)
        if unknown:
            raise WorkloadError(f"workload {kind!r}: unknown parameter(s) {sorted(unknown)}; "
                                f"allowed: {', '.join(f'{k} (default {v})' for k, v in allowed.items())}")
        self.kind, self.values = kind, {**allowed, **raw}

    def length(self, key: str) -> LengthDist:
        try:
            return parse_length(self.values[key], key)
        except ValueError as e:
            raise WorkloadError(f"workload {self.kind!r}: {e}") from None

    def integer(self, key: str, minimum: int = 0) -> int:
        try:
            v = int(self.values[key])
        except ValueError:
            raise WorkloadError(f"workload {self.kind!r}: {key}={self.values[key]!r} is not an integer") from None
        if v < minimum:
            raise WorkloadError(f"workload {self.kind!r}: {key} must be >= {minimum}, got {v}")
        return v

    def number(self, key: str, minimum: float = 0.0) -> float:
        try:
            v = float(self.values[key])
        except ValueError:
            raise WorkloadError(f"workload {self.kind!r}: {key}={self.values[key]!r} is not a number") from None
        if v < minimum:
            raise WorkloadError(f"workload {self.kind!r}: {key} must be >= {minimum}, got {v}")
        return v


def _synthetic(p: _Params) -> Workload:
    inp, out = p.length("input"), p.length("output")

    def units(seed: int) -> Iterator[Unit]:
        rng = np.random.default_rng(seed)
        while True:
            ins, outs = inp.sample(rng, 256).tolist(), out.sample(rng, 256).tolist()
            # the 256 prompts' words in one draw: the same values as a draw per prompt in turn (the bit
            # generator carries its spare bits between calls), one numpy call and one word lookup instead of 256
            counts = [max(0, i) for i in ins]
            ids = word_indices(sum(counts), rng)
            texts = word_list(ids)
            at = 0
            for i, o, n in zip(ins, outs, counts, strict=True):
                span = ids[at:at + n]
                yield Unit([[RequestSpec([("user", " ".join(texts[at:at + n]))], i, o, word_ids=span)]])
                at += n

    return Workload(p.kind, p.values, units, f"{p.kind}: input {inp} tokens, output {out} tokens")


def _popularity(p: _Params, n: int) -> np.ndarray | None:
    """Group weights from `popularity=uniform | zipf(S)` (the k-th group's share ∝ 1/k^S); None
    for uniform, which keeps the round-robin-permutation order of earlier runs."""
    spec = p.values["popularity"].strip().lower()
    if spec == "uniform":
        return None
    if spec.startswith("zipf(") and spec.endswith(")"):
        try:
            s = float(spec[5:-1])
        except ValueError:
            s = -1.0
        if s > 0:
            w = 1.0 / np.arange(1, n + 1) ** s
            return w / w.sum()
    raise WorkloadError(f"{p.kind}: popularity must be uniform or zipf(S) with S > 0, got {spec!r}")


def _shared_prefix(p: _Params) -> Workload:
    groups, users = p.integer("groups", 1), p.integer("users", 1)
    system, question, out = p.integer("system", 0), p.length("question"), p.length("output")
    weights = _popularity(p, groups)

    def unit(seed: int, g: int, u: int, q_len: int, rng: np.random.Generator) -> Unit:
        msgs = [("system", keyed_words(system, seed, "system", g)), ("user", keyed_words(q_len, seed, "user", g, u))]
        return Unit([[RequestSpec(msgs, system + q_len, int(out.sample(rng, 1)[0]), group=f"g{g}")]])

    def units(seed: int) -> Iterator[Unit]:
        rng = np.random.default_rng(seed)
        prompts = [(g, u) for g in range(groups) for u in range(users)]
        q_len = question.sample(np.random.default_rng(seed + 1), len(prompts))
        while True:
            if weights is None:
                for idx in rng.permutation(len(prompts)):
                    g, u = prompts[idx]
                    yield unit(seed, g, u, int(q_len[idx]), rng)
            else:
                g, u = int(rng.choice(groups, p=weights)), int(rng.integers(users))
                yield unit(seed, g, u, int(q_len[g * users + u]), rng)

    return Workload(p.kind, p.values, units,
                    f"shared-prefix: {groups} groups × {users} users ({p.values['popularity']} popularity), "
                    f"system prompt {system} tokens, question {question}, output {out}")


def _multi_turn(p: _Params) -> Workload:
    turns, system = p.integer("turns", 1), p.integer("system", 0)
    inp, out, think = p.length("input"), p.length("output"), p.number("think")

    def units(seed: int) -> Iterator[Unit]:
        rng = np.random.default_rng(seed)
        for session in itertools.count():
            history: list[Message] = [("system", keyed_words(system, seed, "sys"))] if system else []
            tokens = system
            stages = []
            for _ in range(turns):
                i, o = int(inp.sample(rng, 1)[0]), int(out.sample(rng, 1)[0])
                history = [*history, ("user", words(i, rng))]
                tokens += i
                stages.append([RequestSpec(list(history), tokens, o, session=f"s{session}")])
                # the reply is synthetic text of the requested length, so every body is precomputable
                history = [*history, ("assistant", words(o, rng))]
                tokens += o
            yield Unit(stages, think_s=think)

    return Workload(p.kind, p.values, units,
                    f"multi-turn chat: {turns} turns, input {inp}, output {out} per turn, think {think:g} s")


def _agentic(p: _Params) -> Workload:
    fanout, context = p.integer("fanout", 1), p.integer("context", 0)
    inp, out, aggregate = p.length("input"), p.length("output"), p.integer("aggregate", 0) > 0

    def units(seed: int) -> Iterator[Unit]:
        rng = np.random.default_rng(seed)
        for task in itertools.count():
            ctx = [("system", keyed_words(context, seed, "context", task % 4))] if context else []
            i, o = int(inp.sample(rng, 1)[0]), int(out.sample(rng, 1)[0])
            root_msgs = [*ctx, ("user", words(i, rng))]
            plan = [*root_msgs, ("assistant", words(o, rng))]
            base = context + i + o
            stages = [[RequestSpec(root_msgs, context + i, o, session=f"t{task}")]]
            calls, results = [], []
            for _ in range(fanout):
                ci, co = int(inp.sample(rng, 1)[0]), int(out.sample(rng, 1)[0])
                calls.append(RequestSpec([*plan, ("user", words(ci, rng))], base + ci, co, session=f"t{task}"))
                results.append(("user", words(co, rng)))
            stages.append(calls)
            if aggregate:
                agg_tokens = base + sum(len(r[1].split()) for r in results)
                stages.append([RequestSpec([*plan, *results], agg_tokens, o, session=f"t{task}")])
            yield Unit(stages)

    return Workload(p.kind, p.values, units,
                    f"agentic fan-out: 1 plan call then {fanout} parallel calls sharing a {context}-token "
                    f"context{' then an aggregate call' if aggregate else ''}; input {inp}, output {out}")


def _trace(p: _Params) -> Workload:
    from inferstack.bench.traces import load_trace

    if not p.values["path"]:
        raise WorkloadError("workload 'trace' needs path=FILE (.jsonl or .csv)")
    try:
        rows = load_trace(Path(p.values["path"]), p.values["format"])
    except FileNotFoundError:
        raise WorkloadError(f"trace file {p.values['path']} does not exist") from None
    scale = p.number("time_scale")
    if scale <= 0:
        raise WorkloadError("workload 'trace': time_scale must be > 0")
    limit = p.integer("limit", 0)
    if limit:
        rows = rows[:limit]
    t0 = rows[0].timestamp if rows else 0.0

    def units(seed: int) -> Iterator[Unit]:
        for row in rows:
            yield Unit([[row.request(seed)]], at=(row.timestamp - t0) / scale)

    span = (rows[-1].timestamp - t0) / scale if rows else 0.0
    return Workload(p.kind, p.values, units,
                    f"trace replay: {len(rows)} requests over {span:.1f} s from {p.values['path']}",
                    finite=True, extra={"trace_requests": len(rows), "trace_span_s": span})


_KINDS: dict[str, tuple[Callable[[_Params], Workload], dict[str, str]]] = {
    "synthetic": (_synthetic, {"input": "512", "output": "128"}),
    "long-context": (_synthetic, {"input": "16000", "output": "256"}),
    "shared-prefix": (_shared_prefix, {"groups": "8", "users": "16", "system": "2048", "question": "128",
                                       "output": "128", "popularity": "uniform"}),
    "multi-turn": (_multi_turn, {"turns": "5", "system": "0", "input": "128", "output": "128", "think": "0"}),
    "agentic": (_agentic, {"fanout": "4", "context": "2048", "input": "64", "output": "128", "aggregate": "1"}),
    "trace": (_trace, {"path": "", "format": "auto", "time_scale": "1", "limit": "0"}),
}


def workload_kinds() -> list[str]:
    return list(_KINDS)


def parse_workload(spec: str) -> Workload:
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in _KINDS and Path(spec).suffix.lower() in (".jsonl", ".json", ".csv"):
        kind, rest = "trace", f"path={spec}"
    if kind not in _KINDS:
        raise WorkloadError(f"unknown workload {kind!r}; known: {', '.join(_KINDS)} (or a .jsonl/.csv trace)")
    build, defaults = _KINDS[kind]
    return build(_Params(kind, _split_params(rest), defaults))
