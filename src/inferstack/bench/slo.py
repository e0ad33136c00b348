"""SLO specs: `ttft=200ms,tpot=50ms[,itl=..][,e2e=2s][,attainment=0.95]`.

Values take `ms` or `s` (bare numbers are milliseconds, as in `vllm bench serve --goodput`).
`itl` is the request's mean gap between content chunks (guidellm's `itl_ms`); `attainment` is the
share of requests that must meet every SLO for a goodput search to accept a rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_KEYS = ("ttft", "tpot", "itl", "e2e")
_VALUE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*(ms|s)?\s*$", re.IGNORECASE)


class SLOError(ValueError):
    pass


@dataclass(frozen=True)
class SLO:
    limits_s: dict[str, float]      # metric -> limit in seconds
    attainment: float = 0.95

    def __str__(self) -> str:
        parts = [f"{k}<={v * 1e3:g}ms" for k, v in self.limits_s.items()]
        return ", ".join(parts) + f" (attainment >= {self.attainment:.0%})"


def parse_slo(text: str) -> SLO:
    if not text or not text.strip():
        raise SLOError("empty SLO spec; expected e.g. ttft=200ms,tpot=50ms")
    limits: dict[str, float] = {}
    attainment = 0.95
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise SLOError(f"SLO part {part!r} is not key=value (e.g. ttft=200ms)")
        if key == "attainment":
            try:
                attainment = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
            except ValueError:
                raise SLOError(f"attainment={value!r} is not a number") from None
            if not 0 < attainment <= 1:
                raise SLOError(f"attainment must be in (0, 1] (or a percentage), got {value}")
            continue
        if key not in _KEYS:
            raise SLOError(f"unknown SLO metric {key!r}; use {', '.join(_KEYS)} and optionally attainment")
        m = _VALUE.match(value)
        if not m:
            raise SLOError(f"{key}={value!r}: expected a duration such as 200ms or 0.2s")
        seconds = float(m.group(1)) / (1 if (m.group(2) or "ms").lower() == "s" else 1000)
        if seconds <= 0:
            raise SLOError(f"{key}={value!r}: an SLO must be a positive duration (no request can meet 0)")
        if key in limits:
            raise SLOError(f"SLO metric {key!r} given twice")
        limits[key] = seconds
    if not limits:
        raise SLOError("SLO spec names no metric; use ttft, tpot, itl or e2e")
    if "e2e" in limits and "ttft" in limits and limits["e2e"] < limits["ttft"]:
        raise SLOError(f"impossible SLO: e2e ({limits['e2e'] * 1e3:g} ms) is below ttft "
                       f"({limits['ttft'] * 1e3:g} ms), and E2E always includes TTFT")
    return SLO(limits, attainment)
