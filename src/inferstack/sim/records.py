"""Per-request records of a simulation, streamed to disk, and their summary in `inferstack bench`'s
schema (so `bench.report.markdown` and the plots read it unchanged).

Memory stays bounded: each finished request becomes a `bench.records.RequestRecord` row written to
``requests.csv`` at once; only a few numeric columns per request stay in memory (compact arrays, ~100
bytes a request), plus the ITL gaps and full records of a fixed-size deterministic sample of requests
(for the pooled ITL distribution and the CDF plots).
"""

from __future__ import annotations

import csv
import io
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from inferstack.bench.metrics import DEFINITIONS, dist
from inferstack.bench.records import RequestRecord
from inferstack.bench.slo import SLO

_NAN = float("nan")
_COLUMNS = ("sent", "end", "ttft", "tpot", "e2e", "e2e_per_token", "itl_mean", "prompt", "cached", "output",
            "lag")


class RecordSink:
    def __init__(self, path: Path | None, sample_every: int = 1, max_samples: int = 20_000,
                 max_itl_gaps: int = 2_000_000) -> None:
        self._file: io.TextIOBase | None = path.open("w", newline="") if path is not None else None
        self._writer: Any = None     # a csv.writer once the header is written
        self.cols = {k: array("d") for k in _COLUMNS}
        self._col_list = [self.cols[k] for k in _COLUMNS]
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

    def add(self, rec: RequestRecord) -> None:
        row = rec.to_row()
        if self._file is not None:
            if self._writer is None:
                self._writer = csv.writer(self._file)
                self._writer.writerow(list(row))
            self._writer.writerow(list(row.values()))     # what csv.DictWriter writes, without its checks
        # one append per column, in `_COLUMNS` order (every finished request of a fleet run comes here)
        for column, value in zip(self._col_list, (rec.sent, rec.end, row["ttft_s"], row["tpot_s"], row["e2e_s"],
                                                  row["e2e_per_token_s"], row["itl_mean_s"], rec.prompt_tokens,
                                                  rec.cached_tokens, rec.output_tokens, rec.schedule_lag),
                                 strict=True):
            column.append(_NAN if value is None else value)  # type: ignore[arg-type]
        self.included.append(rec.included)
        self.ok.append(rec.ok)
        self.invalid.append(rec.status == "http_400")
        self.first_stage.append(rec.stage == 0)
        if rec.included:
            self.status[rec.status] += 1
            if not rec.ok and len(self.errors) < 5:
                self.errors.append({"status": rec.status, "error": rec.error[:300]})
        if self.count % self.sample_every == 0 and len(self.samples) < self.max_samples:
            self.samples.append(rec)
            if rec.ok and rec.included and len(self.itl_gaps) < self.max_itl_gaps:
                self.itl_gaps.extend(rec.itls.tolist())
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def column(self, key: str) -> np.ndarray:
        return np.frombuffer(self.cols[key], dtype=float) if len(self.cols[key]) else np.empty(0)

    def summary(self, window: tuple[float, float], slo: SLO | None, target_rate: float | None,
                planned_rate: float | None) -> dict[str, object]:
        """`bench.metrics.summarize`'s schema over the columns (ITL pooled over the sampled requests)."""
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
