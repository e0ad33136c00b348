"""Leader election's decision (kube/lease.py: client-go's rules) and its settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from inferstack.kube.config import LeaderElectionConfig
from inferstack.kube.lease import LeaseRecord, LeaseTiming, decide


def record(holder: str, duration: float = 15.0) -> LeaseRecord:
    return LeaseRecord(holder=holder, duration_s=duration, renew_time="2026-12-06T00:00:00.000000Z", transitions=3)


@pytest.mark.parametrize(("lease", "unchanged_for", "action"), [
    (None, 0.0, "create"),                  # no Lease yet: create it (409 for the losers of a race)
    (record("me"), 100.0, "renew"),         # ours: renew, however old
    (record("other"), 14.9, "follow"),      # held and renewed within the duration (our own clock)
    (record("other"), 15.0, "take"),        # not renewed for a whole duration: take it over
    (record(""), 0.0, "take"),              # released: take it at once
    (record("other", duration=1), 1.0, "take"),  # the holder's duration counts, not ours
])
def test_decide_follows_client_go(lease, unchanged_for, action):
    assert decide(lease, "me", unchanged_for) == action


def test_timing_must_let_a_leader_step_down_before_its_lease_expires():
    with pytest.raises(ValueError, match="retry_period_s < renew_deadline_s < lease_duration_s"):
        LeaseTiming(lease_duration_s=10, renew_deadline_s=10, retry_period_s=2)
    with pytest.raises(ValidationError, match="retry_period_s < renew_deadline_s < lease_duration_s"):
        LeaderElectionConfig(retry_period_s=5, renew_deadline_s=4)
    assert LeaderElectionConfig().lease_duration_s == 15.0
