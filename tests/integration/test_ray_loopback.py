"""A local Ray instance started by rae_scale listens on 127.0.0.1 only: every LISTEN socket of every
Ray process (GCS, raylet, core workers, dashboard/metrics/runtime-env agents, the driver itself).

Both ways rae_scale starts one are checked: ray_session() without an address (data_pipeline jobs,
in-process ray.init) and the head of `rae-scale launch ray` without an address (LocalRayNode).
Each runs in a fresh Python process that has imported ray before starting it, as the pytest
process and the CLI do.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Runs in the child: start the instance the way rae_scale does, run a task and an actor so that
# worker processes exist, then list the LISTEN sockets of this process and all its descendants.
_PROBE = r'''
import json, os, sys, psutil, ray

def listeners():
    me = psutil.Process()
    out = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            name = " ".join(proc.cmdline())[:120]
        except psutil.Error:
            continue
        out += [[proc.pid, name, c.laddr.ip, c.laddr.port] for c in conns if c.status == psutil.CONN_LISTEN]
    return out

def exercise(ray):
    @ray.remote
    def pid():
        return os.getpid()

    @ray.remote
    class Echo:
        def pid(self):
            return os.getpid()

    ray.get([pid.remote(), Echo.remote().pid.remote()])

if sys.argv[1] == "ray_session":
    from data_pipeline.ray_utils import ray_session
    with ray_session(num_cpus=1) as r:
        exercise(r)
        print("LISTENERS " + json.dumps(listeners()), flush=True)
else:
    from launchers.ray_jobs import LocalRayNode
    head = LocalRayNode(num_cpus=1).start()
    try:
        # a job on the head starts its own driver and workers; wait for their sockets with ray.init
        # from this process, which reaches the loopback-only head the way its jobs do
        from data_pipeline.ray_utils import loopback_only
        with loopback_only():
            ray.init(address=head.gcs_address, configure_logging=False)
        exercise(ray)
        print("LISTENERS " + json.dumps(listeners()), flush=True)
        ray.shutdown()
    finally:
        head.stop()
'''


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # gRPC binds IPv6 sockets as ::ffff:127.0.0.1
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _listeners(mode: str) -> list[list]:
    from launchers.ray_jobs import ray_auth_env

    # one auth mode for the head and the probe, which is its client (as launch_ray arranges)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               **ray_auth_env())
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the default (multi-node mode) going in
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("LISTENERS ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-6000:])
    return json.loads(lines[-1].removeprefix("LISTENERS "))


def test_is_loopback_tells_the_addresses_apart():
    assert all(_is_loopback(ip) for ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"))
    assert not any(_is_loopback(ip) for ip in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"))


@pytest.mark.parametrize("mode", ["ray_session", "launch_ray_head"])
def test_every_listening_socket_of_a_local_instance_is_loopback(mode):
    found = _listeners(mode)
    names = " ".join(name for _, name, _, _ in found)
    # the probe saw the whole instance: the GCS, the raylet, the agents and a worker
    for part in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "ray::"):
        assert part in names, (part, found)
    exposed = [entry for entry in found if not _is_loopback(entry[2])]
    assert not exposed, f"listening beyond loopback: {exposed}"
