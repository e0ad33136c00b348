"""Pure routing policy: filters -> weighted scorers -> picker over a `PoolSnapshot`.

No network, no web framework and no gateway server imports: the live gateway, the Envoy ext_proc
picker and the simulator all call this package as is.
"""

from inferstack.gateway.routing.profiles import Profile, Router, RoutingResult
from inferstack.gateway.routing.registry import PRESETS, build_router
from inferstack.gateway.routing.state import RoutingState
from inferstack.gateway.routing.types import EndpointView, PoolSnapshot, RequestView

__all__ = [
    "PRESETS",
    "EndpointView",
    "PoolSnapshot",
    "Profile",
    "RequestView",
    "Router",
    "RoutingResult",
    "RoutingState",
    "build_router",
]
