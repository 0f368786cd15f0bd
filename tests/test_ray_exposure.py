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
import time

import pytest

from scripts.reliability import RAY_METRICS_EXPORTERS, anonymous_use, http_answer, http_status, process_name
from tests.spec_helpers import REPO


def probe() -> None:
    """Runs in a fresh process: start the cluster as the CLI does, then look at it."""
    import psutil
    import ray

    from raysweep.sweep import _init_ray, auth_note

    url = _init_ray(None, True)
    me = psutil.Process()
    # The dashboard head and the autoscaler monitor open their metrics exporters seconds
    # after ray.init returns: a look taken at once misses them.
    deadline = time.time() + 60
    while True:
        procs = {p.pid: process_name(p.pid) for p in [me, *me.children(recursive=True)]}
        listen = sorted(
            {
                (c.laddr.ip, c.laddr.port, procs[c.pid])
                for c in psutil.net_connections("tcp")
                if c.status == "LISTEN" and c.pid in procs
            }
        )
        if set(RAY_METRICS_EXPORTERS) <= {port for _, port, _ in listen} or time.time() > deadline:
            break
        time.sleep(0.5)
    token_file = os.path.expanduser("~/.ray/auth_token")
    token = open(token_file).read().strip()
    dashboard_port = int(url.rsplit(":", 1)[1])
    anonymous = {}
    for ip, port, name in listen:
        if port != dashboard_port:
            status, body = http_answer(f"http://{'127.0.0.1' if ip in ('0.0.0.0', '::') else ip}:{port}/")
            anonymous[port] = [status, anonymous_use(port, name, status, body)]
    gcs = ray.get_runtime_context().gcs_address
    wrong = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={gcs!r}); print('JOINED')"],
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(
        "PROBE "
        + json.dumps(
            {
                "url": url,
                "note": auth_note(),
                "listen": listen,
                "token_mode": os.stat(token_file).st_mode & 0o777,
                "api_without_token": http_status(url + "/api/version"),
                "api_with_token": http_status(url + "/api/version", token),
                "anonymous": anonymous,
                "wrong_token_joined": "JOINED" in wrong.stdout,
            }
        )
    )
    ray.shutdown()


@pytest.mark.slow
def test_the_local_cluster_keeps_token_auth_and_the_dashboard_on_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_enable_metrics"))}
    env["HOME"] = str(tmp_path)  # no token yet: the driver makes one
    r = subprocess.run(
        [sys.executable, "-c", "from tests.test_ray_exposure import probe; probe()"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Token authentication is enabled" not in r.stderr  # Ray's announcement, replaced by ours
    out = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("PROBE "))[6:])
    assert out["url"].startswith("http://127.0.0.1:")
    assert out["note"].startswith("token auth on")
    assert out["token_mode"] == 0o600
    dashboard_port = int(out["url"].rsplit(":", 1)[1])
    assert {ip for ip, port, _ in out["listen"] if port == dashboard_port} == {"127.0.0.1"}
    assert out["api_without_token"] == 401 and out["api_with_token"] == 200
    # Every other port is gRPC (not HTTP at all) or refuses an anonymous request, except Ray's
    # two metrics exporters that no setting closes (read-only Prometheus text; the README
    # names them); the other metrics endpoints Ray would publish are off.
    uses = {int(port): use for port, (_, use) in out["anonymous"].items()}
    assert uses and "OPEN" not in uses.values(), out["anonymous"]
    # Subset, not equality: the exporters bind a fixed port seconds after start, and on a busy
    # machine (or with a port still held by an earlier cluster) they may not be there to find.
    assert {port for port, use in uses.items() if use == "metrics"} <= set(RAY_METRICS_EXPORTERS), out["anonymous"]
    assert not out["wrong_token_joined"]
