"""Length distributions for synthetic workloads: `512`, `uniform(100,1000)`, `normal(512,64)`,
`lognormal(512,0.5)` (median, sigma), `exponential(256)` (mean)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_FORM = re.compile(r"^\s*([a-z]+)\s*\(([^)]*)\)\s*$")
_ARITY = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2, "exponential": 1}


@dataclass(frozen=True)
class LengthDist:
    kind: str
    args: tuple[float, ...]
    minimum: int = 1

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        a = self.args
        if self.kind == "fixed":
            x = np.full(n, a[0])
        elif self.kind == "uniform":
            x = rng.integers(int(a[0]), int(a[1]) + 1, n)
        elif self.kind == "normal":
            x = rng.normal(a[0], a[1], n)
        elif self.kind == "lognormal":
            x = rng.lognormal(np.log(a[0]), a[1], n)
        else:
            x = rng.exponential(a[0], n)
        return np.maximum(np.rint(x), self.minimum).astype(np.int64)

    @property
    def mean(self) -> float:
        a = self.args
        if self.kind == "uniform":
            return (a[0] + a[1]) / 2
        if self.kind == "lognormal":
            return float(a[0] * np.exp(a[1] ** 2 / 2))
        return a[0]

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.args[0]))
        return f"{self.kind}({','.join(f'{v:g}' for v in self.args)})"


def parse_length(text: str, name: str) -> LengthDist:
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        dist = LengthDist("fixed", (float(text),))
    else:
        m = _FORM.match(text)
        if not m or m.group(1) not in _ARITY:
            raise ValueError(f"{name}={text!r}: expected an integer or one of "
                             "uniform(a,b), normal(mean,sd), lognormal(median,sigma), exponential(mean)")
        try:
            args = tuple(float(v) for v in m.group(2).split(","))
        except ValueError:
            raise ValueError(f"{name}={text!r}: arguments must be numbers") from None
        if len(args) != _ARITY[m.group(1)]:
            raise ValueError(f"{name}={text!r}: {m.group(1)} takes {_ARITY[m.group(1)]} argument(s)")
        dist = LengthDist(m.group(1), args)
    if any(v < 0 for v in dist.args) or dist.args[0] <= 0 or (dist.kind == "uniform" and dist.args[1] < dist.args[0]):
        raise ValueError(f"{name}={text!r}: lengths must be positive (and a <= b for uniform)")
    return dist
