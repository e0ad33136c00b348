"""The planner's throughput tables, read off the performance model the emulated engines and the
simulator run (a sweep of the emulator without queueing): one replica's prefill tokens/s at a
prompt length, and its decode ITL and tokens/s by batch size at a context length."""

from __future__ import annotations

from inferstack.autoscale.planner import DecodePoint
from inferstack.sim.perf_model import SeqWork, step_time
from inferstack.sim.profile import Profile

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def planner_tables(profile: Profile, isl: int, osl: int) -> tuple[float, tuple[DecodePoint, ...]]:
    model, hw, tp = profile.model, profile.hardware, profile.tp
    prefill = isl / step_time(model, hw, [SeqWork(0, isl)], tp)
    context = isl + osl // 2
    points = []
    for b in BATCHES:
        itl = step_time(model, hw, [SeqWork(context, 1)] * b, tp)
        points.append(DecodePoint(float(b), itl, b / itl))
    return prefill, tuple(points)
