"""The mountable dashboard router: page, assets from the package, state API."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from inferstack.telemetry.dashboard import dashboard_app


async def provider() -> dict:
    return {"gateway": None, "endpoints": [
        {"name": "e0", "url": "http://127.0.0.1:1", "healthy": True,
         "metrics": 'vllm:num_requests_waiting{model_name="m"} 2\nvllm:kv_cache_usage_perc{model_name="m"} 0.5\n'}]}


def client() -> TestClient:
    return TestClient(Starlette(routes=[Mount("/dashboard", app=dashboard_app(provider))]))


def test_page_links_assets_under_the_mount_point_and_uses_no_cdn() -> None:
    with client() as c:
        page = c.get("/dashboard/")
        assert page.status_code == 200
        assert 'src="/dashboard/static/dashboard.js"' in page.text
        assert "http://" not in page.text and "https://" not in page.text
        js = c.get("/dashboard/static/dashboard.js")
        css = c.get("/dashboard/static/dashboard.css")
        assert js.status_code == 200 and "canvas" in js.text and "https://" not in js.text
        assert css.status_code == 200


def test_state_api_returns_charts_and_endpoints() -> None:
    with client() as c:
        body = c.get("/dashboard/api/state").json()
        assert set(body["charts"]) >= {"ttft", "tpot", "itl", "throughput", "requests", "queue", "kv",
                                       "prefix_hit", "routing"}
        assert body["endpoints"][0]["waiting"] == 2 and body["endpoints"][0]["kv_percent"] == 50.0
        assert body["charts"]["kv"]["series"]["e0"][-1][1] == 50.0
        later = c.get("/dashboard/api/state", params={"since": body["t"]}).json()
        assert all(t > body["t"] for t, _ in later["charts"]["kv"]["series"].get("e0", []))


def test_bad_since_is_an_openai_style_400() -> None:
    with client() as c:
        r = c.get("/dashboard/api/state", params={"since": "yesterday"})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "since"


def test_dashboard_asgi_serves_under_a_prefix_for_raw_asgi_servers() -> None:
    from inferstack.telemetry.dashboard import dashboard_asgi, scraping_state_provider

    provider = scraping_state_provider(lambda: "inferstack_gateway_shed_total 0\n", lambda: [])
    app = dashboard_asgi("/dashboard", provider)
    with TestClient(app) as c:
        assert c.get("/dashboard", follow_redirects=False).status_code in (307, 308)
        assert 'src="/dashboard/static/dashboard.js"' in c.get("/dashboard/").text
        body = c.get("/dashboard/api/state").json()
        assert body["errors"] == [] and body["endpoints"] == []
