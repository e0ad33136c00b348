"""Per-tenant RPM and TPM limits as token buckets (capacity = limit, refill = limit per minute).

RPM takes one token per request. TPM is exact: admission reserves the request's worst case (prompt
estimate + max_tokens for every choice) and admits only while the bucket holds all of it, so
concurrent requests cannot overrun the budget together; the end of the request settles the
reservation to the real usage (a refund, or debt when the estimate was low), and a stream cut short
is settled on the tokens it actually streamed. `RedisLimiter` keeps the buckets in Redis (one Lua
script, Redis's clock) so several gateway replicas enforce one limit together instead of
``limit x replicas``; when Redis fails it raises `LimitStoreError` fast (short socket timeouts, no
retries, then a cool-down that skips the store) and the gateway applies `limits.on_store_failure`.
"""

from __future__ import annotations

import logging
import math
import mmap
import multiprocessing
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("inferstack.gateway.limits")


class LimitStoreError(RuntimeError):
    """The shared limit store could not answer in time."""


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None
    tpm: int | None


class Limiter(Protocol):
    """``acquire_now`` and ``settle_now`` answer without a coroutine when no I/O is needed (buckets in this
    process or in shared memory: every request calls both, and a coroutine that never suspends still costs its
    creation and its `StopIteration`); a limiter whose buckets are elsewhere says so (None, False) and the caller
    awaits ``acquire`` or ``settle``."""

    def acquire_now(self, tenant: str, limits: Limits, tokens: int) -> tuple[float, str] | None:
        """`acquire`'s answer, or None when it needs I/O (then await `acquire`)."""
        ...

    async def acquire(self, tenant: str, limits: Limits, tokens: int) -> tuple[float, str]:
        """(0, "") when admitted (the TPM bucket held all ``tokens`` and now holds them less), else
        (seconds to wait, "rpm" | "tpm"). Raises LimitStoreError when the store cannot answer."""
        ...

    def settle_now(self, tenant: str, limits: Limits, delta_tokens: int) -> bool:
        """`settle` done (True), or False when it needs I/O (then await `settle`)."""
        ...

    async def settle(self, tenant: str, limits: Limits, delta_tokens: int) -> None:
        """Charge ``delta_tokens`` more (refund when negative; the bucket never exceeds its limit)."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Reservation:
    """TPM tokens one request holds from admission until `settle_reservation`."""

    tenant: str
    limits: Limits
    tokens: int
    settled: bool = False


def _settle_failed(res: Reservation, used_tokens: int, exc: LimitStoreError) -> None:
    log.warning("could not settle %d TPM tokens for tenant %s: %s", used_tokens, res.tenant, exc)


def settle_reservation_now(limiter: Limiter, res: Reservation, used_tokens: int) -> bool:
    """`settle_reservation` without a coroutine (`Limiter.settle_now`): True when settled (now or before),
    False when the limiter needs its store: then await `settle_reservation`."""
    if res.settled:
        return True
    try:
        res.settled = limiter.settle_now(res.tenant, res.limits, used_tokens - res.tokens)
    except LimitStoreError as exc:
        res.settled = True
        _settle_failed(res, used_tokens, exc)
    return res.settled


async def settle_reservation(limiter: Limiter, res: Reservation, used_tokens: int) -> None:
    """Settle once to what the request really used; a store failure here only loses accuracy."""
    if settle_reservation_now(limiter, res, used_tokens):
        return
    res.settled = True
    try:
        await limiter.settle(res.tenant, res.limits, used_tokens - res.tokens)
    except LimitStoreError as exc:
        _settle_failed(res, used_tokens, exc)


class MemoryLimiter:
    """One replica's buckets: {(tenant, kind): [tokens, last refill time]}."""

    def __init__(self) -> None:
        self._b: dict[tuple[str, str], list[float]] = {}

    def _level(self, key: tuple[str, str], limit: int, now: float) -> list[float]:
        b = self._b.get(key)
        if b is None:
            b = self._b[key] = [float(limit), now]
        else:
            full, level = float(limit), b[0] + (now - b[1]) * limit / 60.0
            b[0] = level if level < full else full  # min(full, level), without the builtin's call cost
            b[1] = now
        return b

    def acquire_now(self, tenant: str, limits: Limits, tokens: int) -> tuple[float, str]:
        now = time.monotonic()
        if limits.rpm:
            r = self._level((tenant, "rpm"), limits.rpm, now)
            if r[0] < 1.0:
                return (1.0 - r[0]) * 60.0 / limits.rpm, "rpm"
        if limits.tpm:
            t = self._level((tenant, "tpm"), limits.tpm, now)
            if t[0] < tokens:
                return (tokens - t[0]) * 60.0 / limits.tpm, "tpm"
            t[0] -= tokens
        if limits.rpm:
            r[0] -= 1.0
        return 0.0, ""

    async def acquire(self, tenant: str, limits: Limits, tokens: int) -> tuple[float, str]:
        return self.acquire_now(tenant, limits, tokens)

    def settle_now(self, tenant: str, limits: Limits, delta_tokens: int) -> bool:
        if limits.tpm and delta_tokens:
            t = self._level((tenant, "tpm"), limits.tpm, time.monotonic())
            full, level = float(limits.tpm), t[0] - delta_tokens
            t[0] = level if level < full else full
        return True

    async def settle(self, tenant: str, limits: Limits, delta_tokens: int) -> None:
        self.settle_now(tenant, limits, delta_tokens)

    async def close(self) -> None:
        return None


class SharedMemoryLimiter(MemoryLimiter):
    """`MemoryLimiter`'s buckets in memory shared by the gateway's worker processes (made before they
    are forked), so N workers enforce one limit, not N x the limit, without a Redis round trip.

    One slot of two doubles (tokens, last refill on the system-wide monotonic clock) per configured
    tenant and kind; an inter-process lock makes each check-and-take atomic. A lock not obtained
    within ``timeout_s`` (a worker killed inside the few microseconds it holds it) is reported as a
    `LimitStoreError`, so `limits.on_store_failure` applies as for Redis."""

    def __init__(self, tenants: Iterable[str], timeout_s: float = 0.25) -> None:
        super().__init__()
        names = sorted(set(tenants))
        self._slot = {(t, kind): 2 * (2 * i + k) for i, t in enumerate(names) for k, kind in enumerate(("rpm", "tpm"))}
        self._mem = mmap.mmap(-1, max(1, len(self._slot)) * 16)  # anonymous MAP_SHARED: inherited by fork
        self._d = memoryview(self._mem).cast("d")
        for i in range(len(self._d)):
            self._d[i] = math.nan  # "never used": filled to the limit on first use
        self._lock = multiprocessing.get_context("fork").Lock()
        self._timeout_s = timeout_s

    def _level(self, key: tuple[str, str], limit: int, now: float) -> memoryview:  # type: ignore[override]
        at = self._slot[key]
        b = self._d[at:at + 2]
        if math.isnan(b[1]):
            b[0], b[1] = float(limit), now
        else:
            b[0] = min(float(limit), b[0] + (now - b[1]) * limit / 60.0)
            b[1] = now
        return b

    # the lock is held for a few microseconds, never across I/O; `acquire` and `settle` (MemoryLimiter's) call these
    def acquire_now(self, tenant: str, limits: Limits, tokens: int) -> tuple[float, str]:
        if not self._lock.acquire(timeout=self._timeout_s):
            raise LimitStoreError("shared limit buckets locked for too long (a worker died holding them?)")
        try:
            return super().acquire_now(tenant, limits, tokens)
        finally:
            self._lock.release()

    def settle_now(self, tenant: str, limits: Limits, delta_tokens: int) -> bool:
        if not self._lock.acquire(timeout=self._timeout_s):
            raise LimitStoreError("shared limit buckets locked for too long (a worker died holding them?)")
        try:
            return super().settle_now(tenant, limits, delta_tokens)
        finally:
            self._lock.release()


# KEYS: rpm bucket, tpm bucket. ARGV: rpm limit (0 = none), tpm limit (0 = none), tokens to charge,
# mode (0 = acquire, 1 = settle). Returns {wait_ms, which} with which 0 = ok, 1 = rpm, 2 = tpm.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function level(key, limit)
  local v = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(v[1])
  local ts = tonumber(v[2])
  if tokens == nil then return limit end
  return math.min(limit, tokens + (now - ts) * limit / 60.0)
end
local function store(key, tokens)
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('EXPIRE', key, 120)
end
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local charge = tonumber(ARGV[3])
if ARGV[4] == '1' then
  if tpm > 0 then store(KEYS[2], math.min(tpm, level(KEYS[2], tpm) - charge)) end
  return {0, 0}
end
local r = 0
if rpm > 0 then
  r = level(KEYS[1], rpm)
  if r < 1 then return {math.ceil((1 - r) * 60000 / rpm), 1} end
end
if tpm > 0 then
  local tk = level(KEYS[2], tpm)
  if tk < charge then return {math.ceil((charge - tk) * 60000 / tpm), 2} end
  store(KEYS[2], tk - charge)
end
if rpm > 0 then store(KEYS[1], r - 1) end
return {0, 0}
"""


class RedisLimiter:
    """Buckets in Redis. ``timeout_s`` bounds each call (a stopped Redis must not hold requests for
    the client library's 5 s default x retries); after a failure the store is skipped for
    ``retry_s`` so every request does not pay the timeout again during an outage."""

    def __init__(self, url: str, prefix: str = "inferstack:gw:limit:", timeout_s: float = 0.25,
                 retry_s: float = 1.0):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._redis = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                        retry=Retry(NoBackoff(), 0))
        self._script = self._redis.register_script(_LUA)
        self._prefix = prefix
        self._retry_s = retry_s
        self._down_until = 0.0
        self._down_reason = ""

    async def _run(self, tenant: str, limits: Limits, tokens: int, mode: int) -> tuple[float, str]:
        from redis.exceptions import RedisError

        if time.monotonic() < self._down_until:
            raise LimitStoreError(self._down_reason)
        p = self._prefix + tenant
        try:
            wait_ms, which = await self._script(keys=[p + ":rpm", p + ":tpm"],
                                                args=[limits.rpm or 0, limits.tpm or 0, tokens, mode])
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + self._retry_s
            self._down_reason = f"limit store unreachable ({type(exc).__name__}: {exc})"
            raise LimitStoreError(self._down_reason) from exc
        return int(wait_ms) / 1000.0, ("", "rpm", "tpm")[int(which)]

    def acquire_now(self, tenant: str, limits: Limits, tokens: int) -> None:
        return None  # a round trip to Redis: always `acquire`

    async def acquire(self, tenant: str, limits: Limits, tokens: int) -> tuple[float, str]:
        return await self._run(tenant, limits, tokens, 0)

    def settle_now(self, tenant: str, limits: Limits, delta_tokens: int) -> bool:
        return False

    async def settle(self, tenant: str, limits: Limits, delta_tokens: int) -> None:
        if limits.tpm and delta_tokens:
            await self._run(tenant, limits, delta_tokens, 1)

    async def close(self) -> None:
        await self._redis.aclose()
