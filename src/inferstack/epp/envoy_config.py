"""An Envoy bootstrap wired to the picker the way GIE gateways wire theirs (docs/kubernetes.md).

ext_proc filter: header and trailer modes SEND, both body modes FULL_DUPLEX_STREAMED (Envoy
rejects FULL_DUPLEX unless that direction's trailer mode is SEND), a long message timeout (a
queued request waits in flow control before the picker answers), ``metadata_options`` forwarding
and receiving ``envoy.lb``. Upstream, either

- ``original_dst`` (llm-d's standalone gateway): an ORIGINAL_DST cluster that connects to the
  address in ``x-gateway-destination-endpoint``. With no picker answer there is nowhere to go,
  so this is for fail-close; or
- ``override_host``: a static cluster of the pool's endpoints whose load balancer takes the host
  from the same header / ``envoy.lb`` metadata and falls back to round robin when absent: what
  fail-open (``failure_mode_allow``) needs to still serve when the picker is down.

The served endpoint goes back to the picker as ``envoy.lb`` / ``x-gateway-destination-endpoint-served``
metadata: the route stamps ``%UPSTREAM_REMOTE_ADDRESS%`` on the response, and a header-to-metadata
filter (after ext_proc, so it runs first on the response path) copies it into metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from inferstack.epp.messages import DESTINATION, LB_NAMESPACE, SERVED, SUBSET_KEY, SUBSET_NAMESPACE

_T = "type.googleapis.com/"
_ROUND_ROBIN = _T + "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_PREVIOUS_HOSTS = _T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def ext_proc_filter(
    failure_mode_allow: bool,
    request_body_mode: str = "FULL_DUPLEX_STREAMED",
    response_body_mode: str = "FULL_DUPLEX_STREAMED",
) -> dict[str, Any]:
    forwarded = [LB_NAMESPACE, SUBSET_NAMESPACE]
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}, "timeout": "10s"},
            "failure_mode_allow": failure_mode_allow,
            "message_timeout": "1000s",
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": request_body_mode,
                "response_body_mode": response_body_mode,
                "request_trailer_mode": "SEND",
                "response_trailer_mode": "SEND",
            },
            "metadata_options": {
                "forwarding_namespaces": {"untyped": forwarded},
                "receiving_namespaces": {"untyped": [LB_NAMESPACE]},
            },
        },
    }


def _headers_to_metadata(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {"@type": _T + "envoy.extensions.filters.http.header_to_metadata.v3.Config", **rules},
    }


# Response path: the served endpoint (stamped by the route) into envoy.lb metadata for the picker.
_SERVED_RULE = {
    "response_rules": [
        {
            "header": SERVED,
            "on_header_present": {"metadata_namespace": LB_NAMESPACE, "key": SERVED, "type": "STRING"},
        }
    ]
}
# Request path (optional): a client header into the subset hint, standing in for a gateway that
# computes subsets itself (session affinity, zones).
_SUBSET_RULE = {
    "request_rules": [
        {
            "header": SUBSET_KEY,
            "remove": True,
            "on_header_present": {
                "metadata_namespace": SUBSET_NAMESPACE,
                "key": SUBSET_KEY,
                "type": "STRING",
            },
        }
    ]
}


def pool_cluster(
    kind: Literal["original_dst", "override_host"], endpoints: Sequence[tuple[str, int]]
) -> dict[str, Any]:
    if kind == "original_dst":
        return {
            "name": "pool",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "2s",
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION},
        }
    return {
        "name": "pool",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": "pool",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(h, p)}} for h, p in endpoints]}],
        },
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.override_host",
                        "typed_config": {
                            "@type": _T
                            + "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                            "override_host_sources": [
                                {"header": DESTINATION},
                                {"metadata": {"key": LB_NAMESPACE, "path": [{"key": DESTINATION}]}},
                            ],
                            "fallback_policy": {
                                "policies": [
                                    {
                                        "typed_extension_config": {
                                            "name": "envoy.load_balancing_policies.round_robin",
                                            "typed_config": {
                                                "@type": _ROUND_ROBIN
                                            },
                                        }
                                    }
                                ]
                            },
                        },
                    }
                }
            ]
        },
    }


def _route_config(retry: bool) -> dict[str, Any]:
    """Everything to the pool; the response names the endpoint that served it (for the picker). With
    ``retry``, a request whose endpoint refuses the connection is retried on the next address of the
    destination list (the picker's `fallback_endpoints`), which the override_host policy walks."""
    route: dict[str, Any] = {"cluster": "pool", "timeout": "86400s"}
    if retry:
        route["retry_policy"] = {"retry_on": "connect-failure,refused-stream", "num_retries": 2,
                                 "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                                           "typed_config": {"@type": _PREVIOUS_HOSTS}}],
                                 "host_selection_retry_max_attempts": 3}
    return {
        "name": "inference",
        "virtual_hosts": [
            {
                "name": "pool",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": route}],
                "response_headers_to_add": [
                    {
                        "header": {"key": SERVED, "value": "%UPSTREAM_REMOTE_ADDRESS%"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
            }
        ],
    }


def _epp_cluster(epp: tuple[str, int]) -> dict[str, Any]:
    """The picker, over HTTP/2 (gRPC), health-checked on the ExternalProcessor service (as llm-d's Envoy
    does): a picker that drains (NOT_SERVING on SIGTERM) or dies leaves the cluster with no healthy host,
    and with panic routing off Envoy then fails the ext_proc call at once — before any body chunk —
    which `failure_mode_allow` turns into fail-open instead of a 500 mid-request."""
    return {
        "name": "epp",
        "type": "STATIC",
        "connect_timeout": "1s",
        "health_checks": [{"timeout": "0.5s", "interval": "0.5s", "unhealthy_threshold": 1,
                           "healthy_threshold": 1, "no_traffic_interval": "0.5s",
                           "grpc_health_check": {"service_name": EXT_PROC_SERVICE}}],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "epp",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(*epp)}}]}],
        },
    }


def bootstrap(
    listen: tuple[str, int],
    admin: tuple[str, int],
    epp: tuple[str, int],
    *,
    failure_mode_allow: bool = False,
    cluster: Literal["original_dst", "override_host"] = "original_dst",
    endpoints: Sequence[tuple[str, int]] = (),
    request_body_mode: str = "FULL_DUPLEX_STREAMED",
    response_body_mode: str = "FULL_DUPLEX_STREAMED",
    subset_from_header: bool = False,
) -> dict[str, Any]:
    """A complete Envoy bootstrap (as a dict; dump it as YAML or JSON) for one pool behind the picker."""
    hcm = {
        "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inference",
        "route_config": _route_config(retry=cluster == "override_host"),
        # request path runs this list in order, the response path in reverse
        "http_filters": [
            *([_headers_to_metadata(_SUBSET_RULE)] if subset_from_header else []),
            ext_proc_filter(failure_mode_allow, request_body_mode, response_body_mode),
            _headers_to_metadata(_SERVED_RULE),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    listener = {
        "name": "inference",
        "address": _addr(*listen),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    return {
        "admin": {"address": _addr(*admin)},
        "static_resources": {
            "listeners": [listener],
            "clusters": [pool_cluster(cluster, endpoints), _epp_cluster(epp)],
        },
    }
