"""Step log: one JSON line per engine step, what the simulator's step model is calibrated against.

Each line is ``{"work": [[context, new_tokens, samples], ...], "seconds": s, "start": t, "step_s": d,
"busy": b}``: the batch's shape and the executor's wall time in the format of `sim.calibrate`'s step
samples (so `load_step_samples` reads it), plus the step's start on the monotonic clock, the whole
``EngineCore.step`` (schedule, forward, sampling, detokenization) and whether work was left after it.
From consecutive lines of a busy engine the *served* step period follows (start to next start: everything
the serving loop does per step), which `sim.calibrate.served_step_samples` fits the step model on.

Off by default; when on, a step costs one ``json.dumps`` and one line-buffered write (a few µs against
steps of milliseconds), and a killed engine loses at most the line being written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from inferstack.engine.scheduler import SchedulerOutput


class StepLog:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(path, "a", buffering=1)  # noqa: SIM115 (open for the engine's lifetime)

    def record(self, batch: SchedulerOutput, start: float, execute_s: float, end: float, busy: bool) -> None:
        work = [[s.start, s.num_new_tokens, int(s.sample)] for s in batch.seqs]
        self._file.write(json.dumps({"work": work, "seconds": round(execute_s, 7), "start": round(start, 6),
                                     "step_s": round(end - start, 7), "busy": busy}) + "\n")

    def close(self) -> None:
        self._file.close()
