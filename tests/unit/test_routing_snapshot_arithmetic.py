"""The snapshot arithmetic every request runs (`routing/types.py`: load, the queue as of now, saturation, room)
written with conditionals instead of the min/max builtins: the same values as the builtin formulas, for any
endpoint state, NaN and negative readings included (hypothesis)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.gateway.routing.types import UNBOUNDED, EndpointView, PoolSnapshot

_reading = st.one_of(st.floats(-4, 64, allow_nan=False), st.just(math.nan), st.sampled_from([0.0, -0.0, 1.0]))


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def _queued_now(e: EndpointView, trust: bool) -> float:  # the builtin formula
    if not e.reports_queue:
        return 0.0
    free = max(0.0, e.batch_cap - e.running) if e.batch_cap and e.queue <= 0 and trust else 0.0
    return e.queue + max(0.0, e.in_flight - e.running - e.queue - free)


def _room(p: PoolSnapshot, e: EndpointView) -> int:  # the builtin formula
    if not e.healthy:
        return 0
    room = UNBOUNDED if not e.max_concurrency else max(0, e.max_concurrency - e.in_flight)
    if e.has_metrics and e.metrics_age_s <= max(2.0, 10 * p.stale_after_s):
        limit = p.queue_limit(e)
        queued = _queued_now(e, limit >= 1.0)
        left = math.ceil(limit - queued)
        if queued > 0 and e.kv_usage >= p.kv_threshold:
            left = min(left, 0)
        room = min(room, left)
    return room


def _saturation(p: PoolSnapshot, e: EndpointView) -> float:  # the builtin formula
    if not e.healthy:
        return 1.0
    s = 0.0
    if e.has_metrics and e.metrics_age_s <= max(2.0, 10 * p.stale_after_s):
        limit = p.queue_limit(e)
        queued = _queued_now(e, limit >= 1.0)
        s = max(queued / limit, e.kv_usage / p.kv_threshold if queued > 0 else 0.0)
    if e.max_concurrency:
        s = max(s, e.in_flight / e.max_concurrency)
    return s


@settings(max_examples=400, deadline=None)
@given(queue=_reading, running=_reading, kv=_reading, in_flight=st.integers(0, 80), cap=st.integers(0, 64),
       max_conc=st.one_of(st.none(), st.integers(1, 40)), age=st.floats(0, 30), has_metrics=st.booleans(),
       reports=st.booleans(), healthy=st.booleans(), held=st.integers(0, 5), stale=st.floats(0.01, 1.0),
       drain=st.one_of(st.none(), st.floats(0.0, 20.0)), trust=st.booleans())
def test_snapshot_arithmetic_equals_the_builtin_min_max_formulas(queue, running, kv, in_flight, cap, max_conc, age,
                                                                 has_metrics, reports, healthy, held, stale, drain,
                                                                 trust):
    e = EndpointView("a", queue=queue, running=running, kv_usage=kv, metrics_age_s=age, has_metrics=has_metrics,
                     in_flight=in_flight, healthy=healthy, max_concurrency=max_conc, batch_cap=cap,
                     reports_queue=reports, drain_s=drain, held=held)
    p = PoolSnapshot([e], stale_after_s=stale)
    assert _same(e.queued_now(trust), _queued_now(e, trust))
    assert _same(e.load(), max(float(in_flight), queue + running) + held)
    if not math.isnan(queue) and not math.isnan(running):  # a NaN queue makes ``ceil`` raise, old and new alike
        assert p.room(e) == _room(p, e)
        assert p.free_slots(positive=True) == min(UNBOUNDED, max(0, _room(p, e)))
    assert _same(p.saturation(e), _saturation(p, e))
