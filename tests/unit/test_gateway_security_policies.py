"""The gateway's security policies as pure functions (issue 19): priority cap, fan-out cap and
token estimate, admin authorization, id bounds, TPM reservations."""

from __future__ import annotations

import asyncio

import pytest

from inferstack.gateway.admin import admin_refusal, is_loopback_host
from inferstack.gateway.auth import capped_priority
from inferstack.gateway.limits import Limits, MemoryLimiter, Reservation, settle_reservation
from inferstack.gateway.requests import (
    check_fan_out,
    prompt_token_estimate,
    session_key,
    set_gateway_fields,
)
from inferstack.protocol.errors import APIError
from inferstack.protocol.ids import bounded_key, clean_request_id


def test_priority_can_be_lowered_never_raised():
    assert capped_priority(10, 0) == 0
    assert capped_priority(-1, 0) == -1
    assert capped_priority(5, 10) == 5


def test_gateway_fields_overwrite_the_clients():
    req = {"priority": -99, "kv_transfer_params": {"remote_host": "x"}, "cache_salt": "mine", "model": "a"}
    set_gateway_fields(req, model="up", salt="tenant", priority=0)
    assert req == {"cache_salt": "tenant", "model": "up"}
    set_gateway_fields(req, model="up", salt="tenant", priority=3)
    assert req["priority"] == -3


def test_fan_out_cap_and_every_prompt_in_the_estimate():
    assert check_fan_out("completions", {"prompt": ["a", "b"], "n": 3}, 6) == 6
    with pytest.raises(APIError) as e:
        check_fan_out("completions", {"prompt": [[1, 2]] * 4, "best_of": 2}, 6)
    assert e.value.status == 400 and e.value.code == "too_many_completions"
    assert check_fan_out("completions", {"prompt": [1, 2, 3], "n": 2}, 6) == 2  # one token-id prompt
    assert prompt_token_estimate("completions", {"prompt": ["x" * 400] * 3}, 400) == 300
    assert prompt_token_estimate("completions", {"prompt": [[1] * 50, [2] * 70]}, 0) == 120
    assert prompt_token_estimate("completions", {"prompt": [7] * 33}, 0) == 33
    assert prompt_token_estimate("chat", {"messages": []}, 80) == 20


def test_ids_and_session_keys_are_bounded():
    assert clean_request_id("a b\n" + "c" * 500) == "a_b_" + "c" * 124
    long = "s" * 10_000
    assert session_key({}, long.encode()) == bounded_key(long) != bounded_key(long + "t")
    assert len(bounded_key(long)) == 71 and session_key({"user": "u1"}, None) == "u1"


@pytest.mark.parametrize(("host", "ok"), [
    (b"127.0.0.1:8080", True), (b"localhost", True), (b"[::1]:9", True), (b"127.9.9.9", True),
    (b"evil.example", False), (b"localhost.evil.example", False), (None, False), (b"10.0.0.1", False)])
def test_loopback_host_names(host, ok):
    assert is_loopback_host(host) is ok


def test_admin_refusals():
    assert admin_refusal("t0k", b"127.0.0.1", b"Bearer t0k") is None
    assert admin_refusal("t0k", b"127.0.0.1", b"Bearer nope").status == 401
    assert admin_refusal("t0k", b"127.0.0.1", None).status == 401
    assert admin_refusal("t0k", b"evil.example", b"Bearer t0k").status == 403


def test_tpm_reservation_is_exact_and_settles_back():
    async def main():
        lim, limits = MemoryLimiter(), Limits(rpm=None, tpm=1000)
        assert (await lim.acquire("t", limits, 600))[0] == 0
        wait, which = await lim.acquire("t", limits, 600)  # 400 left: the whole reservation must fit
        assert which == "tpm" and wait > 0
        res = Reservation("t", limits, 600)
        await settle_reservation(lim, res, 100)  # used 100 of 600: 500 come back
        await settle_reservation(lim, res, 100)  # once only
        assert (await lim.acquire("t", limits, 850))[0] == 0

    asyncio.run(main())
