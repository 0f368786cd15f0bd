"""What the local cluster of `raysweep run` exposes, measured on a real cluster started the way
the CLI starts it, in a user's environment (no RAY_AUTH_MODE, a home without a Ray token).

Ray resolves a node IP of 127.0.0.1 to the machine's routable address and its gRPC servers
listen on every interface, so what keeps them closed is the token: the test checks that no
port answers without it, and that the dashboard is on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import REPO


def _get(url: str, token: str | None = None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        return urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code
    except Exception as exc:  # noqa: BLE001 - a gRPC port answers HTTP with garbage: that is the point
        return type(exc).__name__


def probe() -> None:
    """Runs in a fresh process: start the cluster as the CLI does, then look at it."""
    import psutil
    import ray

    from raysweep.sweep import _init_ray, auth_note

    url = _init_ray(None, True)
    me = psutil.Process()
    procs = {p.pid: p.name() for p in [me, *me.children(recursive=True)]}
    listen = sorted({(c.laddr.ip, c.laddr.port, procs[c.pid]) for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in procs})
    token_file = os.path.expanduser("~/.ray/auth_token")
    token = open(token_file).read().strip()
    dashboard_port = int(url.rsplit(":", 1)[1])
    anonymous = {port: _get(f"http://{'127.0.0.1' if ip in ('0.0.0.0', '::') else ip}:{port}/") for ip, port, _ in listen if port != dashboard_port}
    gcs = ray.get_runtime_context().gcs_address
    wrong = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={gcs!r}); print('JOINED')"],
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True, text=True, timeout=120,
    )
    print("PROBE " + json.dumps({
        "url": url, "note": auth_note(), "listen": listen, "token_mode": os.stat(token_file).st_mode & 0o777,
        "api_without_token": _get(url + "/api/version"), "api_with_token": _get(url + "/api/version", token),
        "anonymous": anonymous, "wrong_token_joined": "JOINED" in wrong.stdout,
    }))
    ray.shutdown()


@pytest.mark.slow
def test_the_local_cluster_keeps_token_auth_and_the_dashboard_on_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_enable_metrics"))}
    env["HOME"] = str(tmp_path)  # no token yet: the driver makes one
    r = subprocess.run([sys.executable, "-c", "from tests.test_ray_exposure import probe; probe()"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300, start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Token authentication is enabled" not in r.stderr  # Ray's announcement, replaced by ours
    out = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("PROBE "))[6:])
    assert out["url"].startswith("http://127.0.0.1:")
    assert out["note"].startswith("token auth on")
    assert out["token_mode"] == 0o600
    dashboard_port = int(out["url"].rsplit(":", 1)[1])
    assert {ip for ip, port, _ in out["listen"] if port == dashboard_port} == {"127.0.0.1"}
    assert out["api_without_token"] == 401 and out["api_with_token"] == 200
    # Every other port is gRPC (not HTTP at all) or refuses an anonymous request; none serves
    # anything, the Prometheus metrics Ray would otherwise publish included.
    assert out["anonymous"] and all(status == 401 or not isinstance(status, int) for status in out["anonymous"].values()), out["anonymous"]
    assert not out["wrong_token_joined"]
