"""Emulation profiles: `HARDWARE[xTP]:MODEL`, e.g. `h100:llama-3-8b`, `h100x4:llama-3-70b`,
`cpu:smollm2-135m`. HARDWARE is a catalog name or a hardware JSON file; MODEL a catalog name or an
HF config.json. `cpu` uses the calibration written by `inferstack engine calibrate` when one exists."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from inferstack.engine.config import ACCELERATOR_MAX_NUM_SEQS, cpu_max_num_seqs
from inferstack.paths import cache_root
from inferstack.sim.hardware import Hardware, get_hardware, load_hardware_file
from inferstack.sim.models import ModelSpec, get_model

_HW = re.compile(r"^(?P<name>.+?)(?:x(?P<tp>\d+))?$")


def calibration_path() -> Path:
    return cache_root() / "hardware" / "cpu.json"


@dataclass(frozen=True)
class Profile:
    hardware: Hardware
    model: ModelSpec
    tp: int = 1
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.hardware.name}:{self.model.name}"


class ProfileError(ValueError):
    pass


def parse_profile(text: str, calibration: Path | None = None) -> Profile:
    hw_part, sep, model_part = text.partition(":")
    if not sep or not hw_part or not model_part:
        raise ProfileError(f"--emulate {text!r}: expected HARDWARE:MODEL, e.g. h100:llama-3-8b or cpu:smollm2-135m")
    try:
        if hw_part.endswith(".json") and Path(hw_part).is_file():
            hw, tp = load_hardware_file(Path(hw_part)), 1
        else:
            m = _HW.match(hw_part.lower())
            assert m is not None
            tp = int(m.group("tp") or 1)
            cal = calibration or calibration_path()
            hw = (load_hardware_file(cal) if m.group("name") == "cpu" and cal.is_file()
                  else get_hardware(m.group("name")))
        model = get_model(model_part)
    except (KeyError, ValueError) as e:
        raise ProfileError(f"--emulate {text!r}: {e.args[0] if e.args else e}") from None
    if tp < 1:
        raise ProfileError(f"--emulate {text!r}: tensor parallel degree must be >= 1")
    return Profile(hw, model, tp, text)


def default_max_num_seqs(profiles: list[Profile]) -> int:
    """The running-batch cap a simulated replica gets when the user sets none: what the engine it stands
    for would use — `cpu_max_num_seqs` of one torch thread (the thread count `cpu` is calibrated with)
    when every profile is `cpu`, else the accelerator default."""
    if profiles and all(p.hardware.name == "cpu" for p in profiles):
        return cpu_max_num_seqs(1)
    return ACCELERATOR_MAX_NUM_SEQS
