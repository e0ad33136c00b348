"""`KeyStore.identify`: the answers with its per-header memo are the answers of a fresh hash every time."""

from __future__ import annotations

import pytest

from inferstack.config.schema import InferstackConfig
from inferstack.gateway.auth import KeyStore, hash_key
from inferstack.protocol.errors import APIError


def _store() -> KeyStore:
    return KeyStore(InferstackConfig.model_validate({
        "pools": {"p": {"endpoints": ["http://127.0.0.1:9"], "models": ["m"]}},
        "keys": [{"sha256": hash_key("sk-a"), "tenant": "a", "models": ["m"]},
                 {"sha256": hash_key("sk-b"), "tenant": "b", "name": "bee"}]}))


def test_known_keys_are_remembered_per_header_and_unknown_ones_never_are():
    keys = _store()
    for _ in range(2):  # the second round answers from the memo
        assert keys.identify(b"Bearer sk-a").tenant == "a"
        assert keys.identify(b"bearer  sk-b ").key_id == "bee"
        for bad in (b"Bearer sk-c", b"Basic sk-a", b"Bearer ", b"sk-a"):
            with pytest.raises(APIError) as err:
                keys.identify(bad)
            assert err.value.status == 401
    assert keys.identify(b"Bearer sk-a") is keys.identify(b"BEARER sk-a")
    assert len(keys._known) == 3  # the three valid spellings; no refused header is kept


def test_the_memo_is_bounded_and_keys_past_it_still_authenticate():
    keys = _store()
    spellings = [b"Bearer " + b" " * i + b"sk-a" for i in range(1500)]
    assert all(keys.identify(s).tenant == "a" for s in spellings)
    assert len(keys._known) == 1024
    assert keys.identify(spellings[-1]).tenant == "a"  # past the bound: hashed again, same answer
