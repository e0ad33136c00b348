"""KV tiers, fastest first: host RAM, local disk, Redis."""

from inferstack.kvstore.tiers.base import Tier
from inferstack.kvstore.tiers.disk import DiskTier
from inferstack.kvstore.tiers.host import HostTier
from inferstack.kvstore.tiers.redis import RedisTier

__all__ = ["DiskTier", "HostTier", "RedisTier", "Tier"]
