"""`POLICY[:key=value,...]` as the CLI and `inferstack.yaml` give it, e.g. `kpa:target=8`,
`slo:ttft_p95=1s,tpot_p95=100ms`, `hpa:metric=kv_usage,target=0.7`, `planner:forecaster=holt`.

Keys are the policy's fields (`docs/autoscaling.md` lists them with defaults); a duration field
(name ending in `_s`) may drop the suffix and takes `ms`, `s` or `m`. Every error names the key."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from inferstack.autoscale.apa import APA
from inferstack.autoscale.forecast import FORECASTERS
from inferstack.autoscale.hpa import HPA
from inferstack.autoscale.kpa import KPA
from inferstack.autoscale.planner import Planner
from inferstack.autoscale.signals import SignalError
from inferstack.autoscale.slo import SLO

POLICIES: dict[str, type] = {"hpa": HPA, "kpa": KPA, "apa": APA, "slo": SLO, "planner": Planner}
_DURATION = re.compile(r"^([0-9]*\.?[0-9]+)\s*(ms|s|m)?$")
_UNIT = {"ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}


class PolicySpecError(ValueError):
    pass


def _value(policy: str, key: str, raw: str, default: Any) -> Any:
    if key.endswith("_s"):
        m = _DURATION.match(raw.strip())
        if not m:
            raise PolicySpecError(f"{policy}: {key.removesuffix('_s')}={raw!r} is not a duration (e.g. 500ms, 2s)")
        return float(m.group(1)) * _UNIT[m.group(2)]
    if key == "forecaster":
        if raw not in FORECASTERS:
            raise PolicySpecError(f"{policy}: forecaster={raw!r}; known: {', '.join(FORECASTERS)}")
        return FORECASTERS[raw]()
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0", "on", "off"):
            raise PolicySpecError(f"{policy}: {key}={raw!r} is not true/false")
        return raw.lower() in ("true", "1", "on")
    if isinstance(default, (int, float)):
        try:
            return type(default)(float(raw)) if isinstance(default, float) else int(raw)
        except ValueError:
            raise PolicySpecError(f"{policy}: {key}={raw!r} is not a number") from None
    return raw


def checked_spec(spec: str) -> str:
    """``spec`` unchanged once it parses: the one check behind every config's ``policy`` field (a bad spec
    raises PolicySpecError, a ValueError, which the config loader reports at file:line)."""
    parse_policy(spec)
    return spec


def parse_policy(spec: str) -> Any:
    """The policy object for ``spec``; PolicySpecError naming what is wrong."""
    name, _, rest = spec.strip().partition(":")
    cls = POLICIES.get(name.strip().lower())
    if cls is None:
        raise PolicySpecError(f"unknown autoscaling policy {name!r}; known: {', '.join(POLICIES)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep:
            raise PolicySpecError(f"{name}: {part!r} is not key=value")
        if key not in fields and key + "_s" in fields:
            key += "_s"
        if key not in fields or key == "decode_table":
            known = ", ".join(k.removesuffix("_s") if k.endswith("_s") else k for k in fields if k != "decode_table")
            raise PolicySpecError(f"{name}: unknown key {key!r}; known: {known}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs[key] = _value(name, key, raw, default)
    try:
        return cls(**kwargs)
    except (ValueError, SignalError) as exc:
        raise PolicySpecError(str(exc)) from None
