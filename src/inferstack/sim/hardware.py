"""Hardware catalog: peak compute, memory bandwidth and the efficiency constants of the roofline model.

Peak numbers are vendor dense (no sparsity) figures. Efficiencies and overheads are what a well-tuned
engine reaches in practice (docs/benchmarking.md, "Performance model"); `cpu` is fitted on this machine by
`inferstack engine calibrate` and can be replaced by a file.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

TB = 1e12
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float            # dense FLOP/s at the compute dtype (bf16 on GPUs)
    mem_bandwidth: float         # bytes/s of device memory
    memory_bytes: float          # device memory capacity
    mfu_prefill: float = 0.5     # achieved share of peak FLOP/s on large GEMMs
    mfu_decode: float = 0.5
    bw_efficiency: float = 0.8   # achieved share of peak bandwidth when streaming weights and KV
    step_overhead_s: float = 0.0       # fixed per step: launch, scheduler, sampling
    seq_overhead_s: float = 0.0        # per sequence in the batch (Python-side bookkeeping, sampling)
    token_overhead_s: float = 0.0      # per scheduled token (embedding gather, logits copy on CPU)
    # Memory time is divided by this for a step of one row (a single decoding sequence): a CPU BLAS
    # runs one row as a matrix-vector product, the cheapest step by far (a 1-sequence decode step
    # costs ~55 ms here where 2-4 sequences cost ~90 ms; `cpu` fits gave 1.35-1.9). GPUs: not measured, 1.
    single_row_bw_gain: float = 1.0
    # Replicas declared on the same cores (`--fleet ...@HOST`) slow each other: a step runs at 1/(1 + c·m)
    # of its speed while m others of its host are mid-step (`sim/cores.py`). Fitted by `engine calibrate
    # --served-steps` from engines that served side by side (0.04-0.3 on the 2-core development machine).
    colocation_slowdown: float = 0.0
    # A shared host's speed drifts: its steps all take f times their modelled time, f log-normal (mean 1, sigma
    # `speed_jitter`) and constant over windows of `speed_jitter_s` virtual seconds, `speed_jitter_corr` the
    # correlation of consecutive windows (`sim/cores.py`, `HostSpeed`). Fitted with the co-location term
    # (0.04-0.09 per 5 s on the 2-core development machine, quiet). 0: every step at its modelled time.
    speed_jitter: float = 0.0
    speed_jitter_s: float = 5.0
    speed_jitter_corr: float = 0.0
    link_bandwidth: float = 0.0        # bytes/s between devices for tensor parallelism (0: no TP)
    link_latency_s: float = 0.0
    # KV transfer between engines on different nodes (prefill/decode disaggregation): the line rate
    # of the device's own NIC (GPUDirect RDMA), the share of it a transfer engine achieves, and the
    # fixed cost of one transfer (connection, descriptors, completion).
    net_bandwidth: float = 0.0         # bytes/s per device (0: no network transfer modelled)
    net_efficiency: float = 0.9
    net_latency_s: float = 0.0
    # Cost and energy of one device (`inferstack sim`): an indicative on-demand cloud price per device-hour
    # and the board power at idle and at full load (energy is modelled as linear in the device's busy
    # share between the two; docs/simulator.md). 0: not modelled.
    price_per_hour: float = 0.0
    power_idle_w: float = 0.0
    power_max_w: float = 0.0

    def __post_init__(self) -> None:
        # a hand-written hardware file must fail here, not as a division by zero in an engine step
        positive = ("peak_flops", "mem_bandwidth", "memory_bytes", "mfu_prefill", "mfu_decode",
                    "bw_efficiency", "single_row_bw_gain", "net_efficiency", "speed_jitter_s")
        for name in (f for f in self.__dataclass_fields__ if f != "name"):
            v = getattr(self, name)
            strict = name in positive
            if isinstance(v, bool) or not isinstance(v, int | float) or (v <= 0 if strict else v < 0):
                raise ValueError(f"hardware {self.name!r}: {name} must be a number {'>' if strict else '>='} 0, "
                                 f"got {v!r}")
        if self.speed_jitter_corr >= 1.0:
            raise ValueError(f"hardware {self.name!r}: speed_jitter_corr must be a number < 1, "
                             f"got {self.speed_jitter_corr!r}")

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


# Peak bf16 dense FLOP/s and HBM bandwidth (SXM parts where there is a choice).
_CATALOG: dict[str, Hardware] = {
    "h100": Hardware("h100", peak_flops=989.4 * TB, mem_bandwidth=3.35 * TB, memory_bytes=80 * GB,
                     step_overhead_s=0.5e-3, seq_overhead_s=5e-6, link_bandwidth=450 * GB, link_latency_s=8e-6,
                     net_bandwidth=50 * GB, net_latency_s=1e-3, price_per_hour=3.0, power_idle_w=90,
                     power_max_w=700),
    "h200": Hardware("h200", peak_flops=989.4 * TB, mem_bandwidth=4.8 * TB, memory_bytes=141 * GB,
                     step_overhead_s=0.5e-3, seq_overhead_s=5e-6, link_bandwidth=450 * GB, link_latency_s=8e-6,
                     net_bandwidth=50 * GB, net_latency_s=1e-3, price_per_hour=3.8, power_idle_w=90,
                     power_max_w=700),
    "a100": Hardware("a100", peak_flops=312 * TB, mem_bandwidth=2.039 * TB, memory_bytes=80 * GB,
                     step_overhead_s=0.7e-3, seq_overhead_s=6e-6, link_bandwidth=300 * GB, link_latency_s=10e-6,
                     net_bandwidth=25 * GB, net_latency_s=1e-3, price_per_hour=1.8, power_idle_w=60,
                     power_max_w=400),
    "l4": Hardware("l4", peak_flops=121 * TB, mem_bandwidth=0.3 * TB, memory_bytes=24 * GB,
                   step_overhead_s=0.8e-3, seq_overhead_s=8e-6, net_bandwidth=12.5 * GB, net_latency_s=1e-3,
                   price_per_hour=0.8, power_idle_w=16, power_max_w=72),
    # This development machine (2 cores), 1 torch thread, fp32 weights, fitted by
    # `inferstack engine calibrate --model smollm2-135m` on the quiet machine (median step error
    # 3 %); refit before comparing: the calibration file in the cache replaces this entry.
    "cpu": Hardware("cpu", peak_flops=79e9, mem_bandwidth=7.9 * GB, memory_bytes=16 * GB,
                    mfu_prefill=1.0, mfu_decode=1.0, bw_efficiency=1.0,
                    step_overhead_s=19.6e-3, seq_overhead_s=1.0e-3, token_overhead_s=0.43e-3, single_row_bw_gain=1.9,
                    net_bandwidth=0.4 * GB, net_efficiency=1.0, net_latency_s=2e-3, price_per_hour=0.1,
                    power_idle_w=10, power_max_w=65),
}


class UnknownHardware(KeyError):
    pass


def hardware_names() -> list[str]:
    return sorted(_CATALOG)


def get_hardware(name: str, overrides_file: Path | None = None) -> Hardware:
    """A catalog entry by name (case-insensitive), or one loaded from a JSON file of Hardware fields."""
    if overrides_file is not None:
        return load_hardware_file(overrides_file)
    key = name.lower()
    if key not in _CATALOG:
        raise UnknownHardware(f"unknown hardware {name!r}; known: {', '.join(hardware_names())}")
    return _CATALOG[key]


class HardwareFileError(ValueError):
    """A hardware JSON file that cannot be used; ``str()`` is ``file:line: message``."""


def _key_line(text: str, key: str) -> int:
    """The line of ``"key":`` in a flat JSON object (1 when absent: the object itself is at fault)."""
    m = re.search(rf'^\s*"{re.escape(key)}"\s*:', text, re.M)
    return text.count("\n", 0, m.start()) + 1 if m else 1


def load_hardware_file(path: Path) -> Hardware:
    """A `Hardware` from a JSON object of its fields (what `inferstack engine calibrate` writes); fields
    left out come from the catalog entry of the same name. Errors name file:line."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise HardwareFileError(f"{path}: cannot read hardware file: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise HardwareFileError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise HardwareFileError(f"{path}:1: expected a JSON object of hardware fields")
    fields = set(Hardware.__dataclass_fields__)
    for key in data:
        if key not in fields:
            raise HardwareFileError(f"{path}:{_key_line(text, key)}: unknown hardware field {key!r}; "
                                    f"allowed: {', '.join(sorted(fields))}")
    base = _CATALOG.get(str(data.get("name", "")).lower())
    try:
        return replace(base, **data) if base else Hardware(**data)
    except TypeError as e:      # a required field missing from a file naming no catalog entry
        raise HardwareFileError(f"{path}:1: {e.args[0]}") from None
    except ValueError as e:     # Hardware.__post_init__ names the field
        bad = re.search(r": (\w+) must be", str(e))
        raise HardwareFileError(f"{path}:{_key_line(text, bad.group(1)) if bad else 1}: {e}") from None


def save_hardware_file(hw: Hardware, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(hw.to_dict(), indent=2) + "\n")
