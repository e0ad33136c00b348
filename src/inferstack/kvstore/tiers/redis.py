"""Remote tier on Redis: binary values under ``<prefix><key hex>``, each with a TTL.

Lookups pipeline one EXISTS per chunk key (one round trip for a whole prefix); loads pipeline
GETEX, which also refreshes the TTL so chunks in use stay while cold ones expire. Redis itself
bounds memory (``maxmemory`` + an eviction policy); this tier does not track bytes. Connection
errors propagate to the store, which counts them and treats the tier as a miss (fail open).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from inferstack.kvstore.settings import DEFAULT_REDIS_TTL_S
from inferstack.kvstore.tiers.base import Tier, Value


class RedisTier(Tier):
    name = "redis"
    medium = "remote"

    def __init__(self, url: str, ttl_s: int = DEFAULT_REDIS_TTL_S, prefix: str = "inferstack:kv:",
                 socket_timeout_s: float = 5.0) -> None:
        super().__init__()
        if ttl_s <= 0:
            raise ValueError(f"redis TTL must be positive seconds, got {ttl_s}")
        self.url = url
        self.ttl_s = ttl_s
        self.prefix = prefix.encode()
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                            socket_connect_timeout=min(socket_timeout_s, 2.0))

    def _k(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._k(key))
        return [bool(n) for n in pipe.execute()]

    def get(self, key: bytes) -> Value | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[Value | None]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.getex(self._k(key), ex=self.ttl_s)
        return pipe.execute()

    def put(self, key: bytes, value: Value) -> bool:
        self._client.set(self._k(key), memoryview(value), ex=self.ttl_s)
        return True

    def delete(self, key: bytes) -> None:
        self._client.delete(self._k(key))

    def close(self) -> None:
        self._client.close()
