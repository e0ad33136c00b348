"""Per-request records of a simulation, streamed to disk, and their summary in `inferstack bench`'s
schema (so `bench.report.markdown` and the plots read it unchanged).

Memory stays bounded: each finished request becomes a `bench.records.RequestRecord` row written to
``requests.csv`` (in batches of 2,048, `RecordSink.flush`); only a few numeric columns per request stay in
memory (compact arrays, ~100 bytes a request), plus the ITL gaps and full records of a fixed-size
deterministic sample of requests (for the pooled ITL distribution and the CDF plots).
"""

from __future__ import annotations

import csv
import io
from array import array
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from inferstack.bench.metrics import DEFINITIONS, dist
from inferstack.bench.records import OK, RequestRecord
from inferstack.bench.slo import SLO

_NAN = float("nan")
_COLUMNS = ("sent", "end", "ttft", "tpot", "e2e", "e2e_per_token", "itl_mean", "prompt", "cached", "output",
            "lag")
# records written per batch: one numpy pass over their ITL gaps instead of four numpy calls a record
_BATCH = 2048
# the columns that are `to_row`'s derived values (its "<name>_s" fields)
_DERIVED = ("ttft", "tpot", "e2e", "e2e_per_token", "itl_mean")


class RecordSink:
    def __init__(self, path: Path | None, sample_every: int = 1, max_samples: int = 20_000,
                 max_itl_gaps: int = 2_000_000) -> None:
        self._file: io.TextIOBase | None = path.open("w", newline="") if path is not None else None
        self._writer: Any = None     # a csv.writer once the header is written
        self.cols = {k: array("d") for k in _COLUMNS}
        self.included = array("b")
        self.ok = array("b")
        self.invalid = array("b")     # refused as an invalid request (HTTP 400: a prompt over the context)
        self.first_stage = array("b")
        self.status: Counter[str] = Counter()
        self.errors: list[dict[str, str]] = []
        self.samples: list[RequestRecord] = []
        self.itl_gaps = array("d")
        self.sample_every = max(1, sample_every)
        self.max_samples = max_samples
        self.max_itl_gaps = max_itl_gaps
        self.count = 0
        self._pending: list[RequestRecord] = []
        self._at: dict[str, int] | None = None      # the derived columns' places in a row, from the first record

    def add(self, rec: RequestRecord) -> None:
        """Take a finished request; rows are written and counted in batches (`flush`)."""
        self._pending.append(rec)
        if len(self._pending) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        """Write and count the pending records, in order: `RequestRecord.to_row`'s values, with the ITL gaps of
        the whole batch worked out at once (`_gap_stats`)."""
        recs, self._pending = self._pending, []
        if not recs:
            return
        if self._at is None:
            header = list(recs[0].to_row())
            self._at = {k: header.index(k + "_s") for k in _DERIVED}
            if self._file is not None:
                self._writer = csv.writer(self._file)
                self._writer.writerow(header)
        gaps = _gap_stats(recs)
        rows = [_row(rec, gaps.get(i)) for i, rec in enumerate(recs)]
        if self._writer is not None:
            self._writer.writerows(rows)     # what csv.DictWriter writes, without its checks
        self._count(recs, rows, gaps)

    def _count(self, recs: list[RequestRecord], rows: list[list[Any]], gaps: dict[int, _Gaps]) -> None:
        assert self._at is not None
        values: dict[str, list[Any]] = {
            "sent": [r.sent for r in recs], "end": [r.end for r in recs], "output": [r.output_tokens for r in recs],
            "prompt": [_NAN if r.prompt_tokens is None else r.prompt_tokens for r in recs],
            "cached": [_NAN if r.cached_tokens is None else r.cached_tokens for r in recs],
            "lag": [r.schedule_lag for r in recs]}
        for key, at in self._at.items():
            values[key] = [_NAN if row[at] is None else row[at] for row in rows]
        for key, column in self.cols.items():
            column.extend(values[key])
        self.included.extend([r.included for r in recs])
        self.ok.extend([r.status == OK for r in recs])
        self.invalid.extend([r.status == "http_400" for r in recs])
        self.first_stage.extend([r.stage == 0 for r in recs])
        for i, rec in enumerate(recs):
            if rec.included:
                self.status[rec.status] += 1
                if rec.status != OK and len(self.errors) < 5:
                    self.errors.append({"status": rec.status, "error": rec.error[:300]})
            if self.count % self.sample_every == 0 and len(self.samples) < self.max_samples:
                self.samples.append(rec)
                g = gaps.get(i)
                if g is not None and rec.included and len(self.itl_gaps) < self.max_itl_gaps:
                    self.itl_gaps.extend(g.values)
            self.count += 1

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def column(self, key: str) -> np.ndarray:
        self.flush()
        return np.frombuffer(self.cols[key], dtype=float) if len(self.cols[key]) else np.empty(0)

    def summary(self, window: tuple[float, float], slo: SLO | None, target_rate: float | None,
                planned_rate: float | None) -> dict[str, object]:
        """`bench.metrics.summarize`'s schema over the columns (ITL pooled over the sampled requests)."""
        self.flush()
        inc = np.frombuffer(self.included, dtype=np.int8).astype(bool) if self.count else np.empty(0, bool)
        ok = inc & (np.frombuffer(self.ok, dtype=np.int8).astype(bool) if self.count else np.empty(0, bool))
        col = {k: self.column(k) for k in _COLUMNS}
        start, end = window
        last_end = float(col["end"][ok].max()) if ok.any() else end
        duration = max(end - start, last_end - start, 1e-9)
        out_tokens = int(np.nansum(col["output"][ok]))
        in_tokens = int(np.nansum(col["prompt"][ok]))
        firsts = inc & (np.frombuffer(self.first_stage, dtype=np.int8).astype(bool) if self.count else inc)
        sends = np.sort(col["sent"][firsts])

        def d(key: str) -> dict[str, float] | None:
            v = col[key][ok]
            return dist(v[~np.isnan(v)])

        cached_ok = ok & ~np.isnan(col["cached"])
        summary: dict[str, object] = {
            "window_s": [start, end], "duration_s": duration,
            "requests": {"sent": int(inc.sum()), "completed": int(ok.sum()), "failed": int(inc.sum() - ok.sum()),
                         "by_status": dict(self.status), "excluded_warmup_cooldown": int(self.count - inc.sum())},
            "throughput": {"requests_per_s": ok.sum() / duration, "output_tokens_per_s": out_tokens / duration,
                           "input_tokens_per_s": in_tokens / duration,
                           "total_tokens_per_s": (in_tokens + out_tokens) / duration},
            "tokens": {"input_total": in_tokens, "output_total": out_tokens, "input_source": "simulated engine"},
            "latency_s": {"ttft": d("ttft"), "tpot": d("tpot"), "itl": dist(np.frombuffer(self.itl_gaps))
                          if len(self.itl_gaps) else None, "e2e": d("e2e"), "e2e_per_token": d("e2e_per_token")},
            "load": {"target_rate": target_rate, "planned_rate": planned_rate,
                     "send_rate": (len(sends) - 1) / (sends[-1] - sends[0])
                     if len(sends) > 2 and sends[-1] > sends[0] else None,
                     "schedule_lag_s": dist(col["lag"][firsts])},
            "prefix_cache_client": {
                "requests_reporting": int(cached_ok.sum()),
                "hit_rate": float(np.nansum(col["cached"][cached_ok]) / max(1.0, np.nansum(col["prompt"][cached_ok])))
                if cached_ok.any() else None},
            "definitions": DEFINITIONS,
        }
        if slo is not None:
            summary["slo"] = self._slo(slo, inc, ok, col, duration)
        if self.errors:
            summary["errors_sample"] = self.errors
        return summary

    def met(self, slo: SLO) -> np.ndarray:
        """Per request, in arrival-record order: completed and within every limit of ``slo``."""
        self.flush()
        ok = np.frombuffer(self.ok, dtype=np.int8).astype(bool) if self.count else np.empty(0, bool)
        return self._meets(slo, ok, {k: self.column(k) for k in _COLUMNS})

    @staticmethod
    def _meets(slo: SLO, ok: np.ndarray, col: dict[str, np.ndarray]) -> np.ndarray:
        """`bench.metrics.meets`, vectorized: a one-token reply has no TPOT/ITL to miss."""
        good = ok.copy()
        for key, limit in slo.limits_s.items():
            v = col["itl_mean" if key == "itl" else key]
            missing = np.isnan(v)
            exempt = missing & (col["output"] < 2) if key in ("tpot", "itl") else np.zeros_like(missing)
            good &= exempt | (~missing & (np.nan_to_num(v, nan=np.inf) <= limit))
        return good

    @staticmethod
    def _slo(slo: SLO, inc: np.ndarray, ok: np.ndarray, col: dict[str, np.ndarray], duration: float) -> dict:
        good = RecordSink._meets(slo, ok, col)
        n_inc, n_good = int(inc.sum()), int(good.sum())
        return {"spec": dict(slo.limits_s), "attainment_target": slo.attainment,
                "attainment": n_good / n_inc if n_inc else 0.0, "goodput_requests_per_s": n_good / duration,
                "met": (n_good / n_inc >= slo.attainment) if n_inc else False}


@dataclass(frozen=True, slots=True)
class _Gaps:
    block: np.ndarray         # the inter-token gaps of records with as many chunks, a row each
    row: int
    mean: float
    peak: float

    @property
    def values(self) -> list[float]:
        """The request's gaps, as `RequestRecord.itls` (only sampled records need them)."""
        return self.block[self.row].tolist()


def _gap_stats(recs: list[RequestRecord]) -> dict[int, _Gaps]:
    """`RequestRecord.itls` with its mean and max for each record (by position) that has gaps, float for float:
    records of one chunk count in one 2-D array, whose row reductions are numpy's own 1-D reductions of
    each row (the same pairwise sum; `tests/unit/test_sim_scale.py` holds them to `to_row`)."""
    by_len: dict[int, list[int]] = {}
    for i, rec in enumerate(recs):
        n = len(rec.chunk_times)
        if n >= 2 and rec.status == OK:
            by_len.setdefault(n, []).append(i)
    out: dict[int, _Gaps] = {}
    for n, idx in by_len.items():
        flat = chain.from_iterable([recs[i].chunk_times for i in idx])
        times = np.fromiter(flat, dtype=np.float64, count=n * len(idx)).reshape(len(idx), n)
        gaps = times[:, 1:] - times[:, :-1]
        means = (np.add.reduce(gaps, axis=1) / (n - 1)).tolist()
        peaks = np.maximum.reduce(gaps, axis=1).tolist()
        for j, i in enumerate(idx):
            out[i] = _Gaps(gaps, j, means[j], peaks[j])
    return out


def _row(rec: RequestRecord, gaps: _Gaps | None) -> list[Any]:
    """`rec.to_row()`'s values in its order, with the same arithmetic on the same floats."""
    ok = rec.status == OK
    ct = rec.chunk_times
    ttft = ct[0] - rec.sent if ok and rec.streamed and ct else None
    e2e = (ct[-1] if ct else rec.end) - rec.sent if ok else None
    out = rec.output_tokens
    tpot = (e2e - ttft) / (out - 1) if ttft is not None and e2e is not None and out >= 2 else None
    return [rec.index, rec.unit, rec.stage, rec.target, rec.status, rec.error, rec.included,
            round(rec.scheduled, 6), round(rec.sent, 6), round(rec.end, 6), rec.input_tokens_nominal,
            rec.output_tokens_nominal, rec.prompt_tokens, rec.cached_tokens, out, len(ct),
            ttft, tpot, e2e, e2e / out if e2e is not None and out >= 1 else None,
            None if gaps is None else gaps.mean, None if gaps is None else gaps.peak, rec.session, rec.group]
