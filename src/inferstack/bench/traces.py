"""Trace files for replay: timestamps and token lengths, optionally prefix or session ids.

Accepted layouts (auto-detected from the header / first record):
- Azure LLM inference trace (CSV): `TIMESTAMP,ContextTokens,GeneratedTokens`, TIMESTAMP a datetime.
- Mooncake trace (JSONL): `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (one id per
  512-token block; equal ids are equal prompt blocks, so prefix sharing replays faithfully).
- Generic (JSONL or CSV): `timestamp` (s), `input_tokens`, `output_tokens`, optional `prefix_id` with
  `prefix_tokens`, optional `session_id` (turns of a session share the session's text as prefix).
Every error names the file and line.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from inferstack.bench.textgen import keyed_words
from inferstack.bench.workloads import RequestSpec

MOONCAKE_BLOCK = 512


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class TraceRow:
    timestamp: float
    input_tokens: int
    output_tokens: int
    prefix_id: str | None = None
    prefix_tokens: int = 0
    session_id: str | None = None
    hash_ids: tuple[int, ...] = ()
    index: int = 0

    def request(self, seed: int) -> RequestSpec:
        if self.hash_ids:
            blocks = [keyed_words(MOONCAKE_BLOCK, seed, "block", h) for h in self.hash_ids]
            text = " ".join(" ".join(blocks).split()[: self.input_tokens])
            return RequestSpec([("user", text)], self.input_tokens, self.output_tokens)
        if self.session_id is not None:
            # turns of one session are prefixes of the session's text stream
            text = keyed_words(self.input_tokens, seed, "session", self.session_id)
            return RequestSpec([("user", text)], self.input_tokens, self.output_tokens, session=self.session_id)
        shared = min(self.prefix_tokens, self.input_tokens) if self.prefix_id is not None else 0
        head = keyed_words(shared, seed, "prefix", self.prefix_id) if shared else ""
        tail = keyed_words(self.input_tokens - shared, seed, "row", self.index)
        return RequestSpec([("user", f"{head} {tail}".strip())], self.input_tokens, self.output_tokens,
                           group=self.prefix_id)


_ALIASES = {
    "timestamp": ("timestamp", "TIMESTAMP", "time", "arrival_time"),
    "input": ("input_tokens", "input_length", "ContextTokens", "prompt_tokens", "input_len"),
    "output": ("output_tokens", "output_length", "GeneratedTokens", "completion_tokens", "output_len"),
}


def _field(rec: dict, which: str, where: str) -> object:
    for name in _ALIASES[which]:
        if name in rec and rec[name] not in (None, ""):
            return rec[name]
    raise TraceError(f"{where}: missing {which} field (one of {', '.join(_ALIASES[which])})")


def _timestamp(value: object, where: str, millis: bool) -> float:
    if isinstance(value, int | float):
        return float(value) / (1000.0 if millis else 1.0)
    text = str(value).strip()
    try:
        return float(text) / (1000.0 if millis else 1.0)
    except ValueError:
        pass
    # Azure: "2023-11-16 18:15:46.6805900" (7 fractional digits; datetime takes 6)
    if "." in text:
        head, frac = text.rsplit(".", 1)
        text = f"{head}.{frac[:6]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise TraceError(f"{where}: timestamp {value!r} is neither a number nor a datetime") from None


def _positive_int(value: object, name: str, where: str, minimum: int = 1) -> int:
    try:
        v = int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {name} {value!r} is not an integer") from None
    if v < minimum:
        raise TraceError(f"{where}: {name} must be >= {minimum}, got {v}")
    return v


def _row(rec: dict, where: str, index: int, millis: bool) -> TraceRow:
    hash_ids = rec.get("hash_ids") or ()
    if not isinstance(hash_ids, list | tuple):
        raise TraceError(f"{where}: hash_ids must be a list of integers")
    prefix = rec.get("prefix_id")
    session = rec.get("session_id")
    return TraceRow(
        timestamp=_timestamp(_field(rec, "timestamp", where), where, millis),
        input_tokens=_positive_int(_field(rec, "input", where), "input length", where),
        output_tokens=_positive_int(_field(rec, "output", where), "output length", where),
        prefix_id=None if prefix in (None, "") else str(prefix),
        prefix_tokens=_positive_int(rec.get("prefix_tokens") or 0, "prefix_tokens", where, 0),
        session_id=None if session in (None, "") else str(session),
        hash_ids=tuple(int(h) for h in hash_ids),
        index=index,
    )


def load_trace(path: Path, fmt: str = "auto") -> list[TraceRow]:
    fmt = fmt.lower()
    if fmt not in ("auto", "jsonl", "csv", "azure", "mooncake"):
        raise TraceError(f"unknown trace format {fmt!r}; use auto, jsonl, csv, azure or mooncake")
    text = path.read_text()
    is_csv = fmt in ("csv", "azure") or (fmt == "auto" and path.suffix.lower() == ".csv")
    rows: list[TraceRow] = []
    if is_csv:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise TraceError(f"{path}:1: empty CSV (expected a header row)")
        for n, rec in enumerate(reader, start=2):
            rows.append(_row(rec, f"{path}:{n}", len(rows), millis=False))
    else:
        millis = fmt == "mooncake"
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise TraceError(f"{path}:{n}: expected a JSON object per line")
            if fmt == "auto" and not rows and "hash_ids" in rec:
                millis = True    # Mooncake timestamps are milliseconds
            rows.append(_row(rec, f"{path}:{n}", len(rows), millis))
    if not rows:
        raise TraceError(f"{path}: the trace has no requests")
    for prev, cur in itertools.pairwise(rows):
        if cur.timestamp < prev.timestamp:
            rows.sort(key=lambda r: r.timestamp)
            break
    return rows
