"""PD router and decider (pure policy), PD config validation, and the prefill leg's request/response."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferstack.config import loader
from inferstack.gateway.datalayer import Pool
from inferstack.gateway.pd import prefill_body, transfer_params
from inferstack.gateway.routing import EndpointView, PoolSnapshot, RequestView, RoutingState
from inferstack.gateway.routing.disagg import Outcome, PDRouter, build_pd_router, decide, pd_free_slots
from inferstack.gateway.routing.prefix import text_prefix_hashes

ROLES = {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode"}


def request(chars: int, text: str = "x") -> RequestView:
    body = (text * chars)[:chars]
    return RequestView(model="m", prefix_hashes=text_prefix_hashes([body], "m", 64, 256), prompt_chars=chars)


def snap(*down: str, roles=ROLES) -> PoolSnapshot:
    return PoolSnapshot([EndpointView(e, healthy=e not in down) for e in roles])


def router(threshold: int = 64, roles=ROLES):
    return build_pd_router("least-load", "least-load", roles, threshold, RoutingState())


def test_long_prompt_is_split_between_a_prefill_and_a_decode_endpoint():
    r = router().route(request(4000), snap())
    assert r.outcome is Outcome.REMOTE
    assert ROLES[r.endpoint.id] == "decode" and ROLES[r.others["prefill"].id] == "prefill"
    assert r.prompt_tokens == 1000 and r.uncached == 1000


def test_short_prompt_stays_on_the_decode_endpoint():
    r = router(threshold=64).route(request(200), snap())
    assert r.outcome is Outcome.CACHED and "prefill" not in r.others and ROLES[r.endpoint.id] == "decode"


def test_prefix_cached_on_the_decode_endpoint_skips_remote_prefill():
    rt = router()
    first = rt.route(request(4000), snap("d1"))
    assert first.outcome is Outcome.REMOTE and first.endpoint.id == "d0"
    again = rt.route(request(4100), snap("d1"))  # same 4000-char prefix, 100 new chars (25 tokens)
    assert again.outcome is Outcome.CACHED and again.endpoint.id == "d0"
    assert again.uncached < 64


def test_no_healthy_prefill_endpoint_means_colocated_on_decode():
    r = router().route(request(4000), snap("p0", "p1"))
    assert r.outcome is Outcome.NO_PREFILL and ROLES[r.endpoint.id] == "decode" and not r.others


def loaded(queues: dict[str, float], roles=ROLES) -> PoolSnapshot:
    return PoolSnapshot([EndpointView(e, queue=queues.get(e, 0.0), has_metrics=True, metrics_age_s=0.0)
                         for e in roles], queue_threshold=5.0)


def test_pd_pool_has_room_only_while_both_sides_do():
    # an idle endpoint with metrics takes queue_threshold (5) requests before it saturates
    assert pd_free_slots(loaded({}), ROLES) == 10
    # saturated prefill engines: split requests would queue behind them, so the pool is full
    assert pd_free_slots(loaded({"p0": 9, "p1": 7}), ROLES) == 0
    # one hot prefill engine's overflow counts against the other's room
    assert pd_free_slots(loaded({"p0": 9}), ROLES) == 1
    assert pd_free_slots(loaded({"p0": 2, "p1": 4}), ROLES) == 4
    assert pd_free_slots(loaded({"d0": 9, "d1": 9}), ROLES) == 0
    # every prefill endpoint down: the router prefills on the decode side, which alone counts
    down = PoolSnapshot([EndpointView(e, healthy=ROLES[e] != "prefill", max_concurrency=3) for e in ROLES])
    assert pd_free_slots(down, ROLES) == 6
    # a colocated (`both`) endpoint is decode-side capacity
    assert pd_free_slots(loaded({}, {"b0": "both"}), {"b0": "both"}) == 5


def test_pd_pool_counts_prefill_legs_in_flight_before_the_engines_report_them():
    """Prefill legs sent since the last scrape fill the prefill side's queue as of now."""
    snap = loaded({})
    for e in snap.endpoints:
        if ROLES[e.id] == "prefill":
            e.in_flight = 4
    assert pd_free_slots(snap, ROLES) == 2
    for e in snap.endpoints:
        e.running = 4.0  # the next scrape shows them running: room again
    assert pd_free_slots(snap, ROLES) == 10


def test_conditional_disaggregation_prefills_on_the_decode_endpoint_while_prefill_queues_are_long():
    rt = build_pd_router("least-load", "least-load", ROLES, 64, RoutingState(), max_prefill_queue=2)
    # distinct texts: a prompt routed before would be a prefix hit on its decode endpoint
    assert rt.route(request(4000, "a"), loaded({"p0": 1, "p1": 3})).outcome is Outcome.REMOTE, "p0 has room"
    busy = rt.route(request(4000, "b"), loaded({"p0": 2, "p1": 3}))
    assert busy.outcome is Outcome.PREFILL_BUSY and ROLES[busy.endpoint.id] == "decode" and not busy.others
    assert rt.route(request(200, "c"), loaded({"p0": 9, "p1": 9})).outcome is Outcome.CACHED, "short prompts stay"
    # without the setting, long queues still mean a remote prefill (flow control holds the overflow)
    assert router().route(request(4000), loaded({"p0": 9, "p1": 9})).outcome is Outcome.REMOTE
    # the overflow runs on the decode side, so only the decode side limits admission
    assert pd_free_slots(loaded({"p0": 9, "p1": 9}), ROLES, conditional=True) == 10


def test_each_side_keeps_max_concurrency():
    eps = [EndpointView(e, max_concurrency=2) for e in ROLES]
    pd = build_pd_router("default", "default", ROLES, 0, RoutingState())  # threshold 0: always split
    for _ in range(4):  # one prompt: prefix affinity alone would put all four on one pair
        r = pd.route(request(4000), PoolSnapshot(eps))
        for e in (r.endpoint, r.others["prefill"]):
            next(x for x in eps if x.id == e.id).in_flight += 1
    assert all(e.in_flight == 2 for e in eps)


def test_no_healthy_decode_endpoint_means_colocated_on_a_prefill_endpoint():
    r = router().route(request(4000), snap("d0", "d1"))
    assert r.outcome is Outcome.NO_DECODE and ROLES[r.endpoint.id] == "prefill"
    assert router().route(request(4000), snap(*ROLES)) is None


def test_a_both_endpoint_serves_colocated():
    roles = {"p0": "prefill", "b0": "both"}
    r = router(roles=roles).route(request(4000), snap(roles=roles))
    assert r.endpoint.id == "b0" and r.outcome is Outcome.BOTH and not r.others


def test_threshold_zero_always_splits():
    assert router(threshold=0).route(request(4), snap()).outcome is Outcome.REMOTE


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.booleans())
def test_decider(uncached, threshold, available):
    out = decide(uncached, threshold, available)
    if uncached < threshold:
        assert out is Outcome.CACHED
    else:
        assert out is (Outcome.REMOTE if available else Outcome.NO_PREFILL)


def test_prefill_leg_body():
    req = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
           "stream_options": {"include_usage": True}, "max_completion_tokens": 50, "min_tokens": 5, "n": 2,
           "temperature": 0, "cache_salt": "acme"}
    leg = orjson.loads(prefill_body(req))
    assert leg == {"model": "m", "messages": req["messages"], "stream": False, "max_tokens": 1, "temperature": 0,
                   "cache_salt": "acme", "kv_transfer_params": {"do_remote_decode": True}}


def test_prefill_leg_response():
    params = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 5, "remote_request_id": "r",
              "remote_num_blocks": 3}
    assert transfer_params(200, orjson.dumps({"choices": [], "kv_transfer_params": params})) == params
    assert transfer_params(503, b"{}") == "status_503"
    assert transfer_params(200, b"not json") == "bad_response"
    assert transfer_params(200, b'{"choices": []}') == "no_params"


CONFIG = """\
pools:
  pd:
    endpoints:
      - url: http://127.0.0.1:1
        role: prefill
      - url: http://127.0.0.1:2
        role: decode
    pd:
      threshold_tokens: 32
"""


def test_pd_pool_config():
    cfg = loader.parse_config(CONFIG, "f.yaml")
    pool = cfg.pools["pd"]
    assert [e.role for e in pool.endpoints] == ["prefill", "decode"]
    assert pool.pd.enabled and pool.pd.threshold_tokens == 32 and pool.pd.max_prefill_queue is None
    conditional = loader.parse_config(CONFIG + "      max_prefill_queue: 2\n", "f.yaml")
    live = Pool.from_config("pd", conditional.pools["pd"], conditional.gateway)
    assert isinstance(live.router, PDRouter) and live.router.max_prefill_queue == 2


@pytest.mark.parametrize(("text", "message"), [
    (CONFIG.replace("role: decode", "role: prefill"), "f.yaml:9: pools.pd.pd: pd needs at least one endpoint "
                                                      "with `role: decode`"),
    (CONFIG.replace("    pd:\n      threshold_tokens: 32\n", ""),
     "f.yaml:5: pools.pd.endpoints.0.role: role 'prefill' needs `pd: {enabled: true}` on pool 'pd'"),
    (CONFIG.replace("role: decode", "role: decoder"), "f.yaml:7: pools.pd.endpoints.1.role: Input should be"),
    (CONFIG + "      prefill_routing: nope\n", "f.yaml:10: pools.pd.pd.prefill_routing: unknown routing 'nope'"),
    (CONFIG.replace("32", "-1"), "f.yaml:9: pools.pd.pd.threshold_tokens: Input should be greater than"),
    (CONFIG + "      max_prefill_queue: 0\n", "f.yaml:10: pools.pd.pd.max_prefill_queue: Input should be greater than"),
])
def test_pd_config_errors_name_file_and_line(text, message):
    with pytest.raises(loader.ConfigError) as err:
        loader.parse_config(text, "f.yaml")
    assert any(p.startswith(message) for p in err.value.problems), err.value.problems


def test_precise_index_drives_the_decider_when_the_request_was_tokenized():
    rt = router(threshold=32)
    hashes = [bytes([i]) * 32 for i in range(20)]  # 20 blocks of 16 tokens
    req = RequestView(model="m", token_hashes=hashes, prompt_chars=40)  # chars alone would say 10 tokens
    assert rt.route(req, snap("d1")).outcome is Outcome.REMOTE
    rt.state.precise.stored("d0", hashes[:19])
    r = rt.route(req, snap("d1"))
    assert r.outcome is Outcome.CACHED and r.prompt_tokens == 320 and r.uncached == 16
