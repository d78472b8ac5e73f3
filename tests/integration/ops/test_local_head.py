"""`recsys serve up`'s local Ray head binds loopback, and `serve down` stops all of it.

Before: the head advertised the machine's own address, the Ray client server listened there
(:10001), the GCS listened on every interface (``*:6385``) and ``serve down`` left the client
server running.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
from pathlib import Path

import psutil
import pytest

from recsys_core.settings import Settings
from recsys_platform.serving.cluster import (
    head_command,
    head_env,
    is_client_server,
    stop_local_head,
)
from tests.fixtures.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _head_processes(port: int) -> list[psutil.Process]:
    session = None
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if f"--gcs_server_port={port}" in cmdline:
            session = next(a.split("=", 1)[1] for a in cmdline if a.startswith("--session-dir="))
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if (session and any(session in a for a in cmdline)) or is_client_server(cmdline, port):
            found.append(proc)
    return found


def test_local_head_listens_on_loopback_and_stops_completely(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(data_dir=tmp_path, ray={"head_port": port})  # type: ignore[arg-type]
    command = head_command(settings) + ["--num-cpus", "1",
                                        "--ray-client-server-port", str(free_port())]
    out = subprocess.run(command, capture_output=True, text=True, timeout=180,
                         env={**os.environ, **head_env(settings)})
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        procs = _head_processes(port)
        [client] = [p for p in procs if is_client_server(p.info["cmdline"] or [], port)]
        assert f"--address=127.0.0.1:{port}" in client.info["cmdline"]  # what it advertises
        listening = set()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                listening |= {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port, proc.name())
                              for c in proc.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN}
        assert listening
        exposed = {entry for entry in listening if not ipaddress.ip_address(entry[0]).is_loopback}
        assert not exposed, exposed
    finally:
        stopped = stop_local_head(port)
    assert stopped > 0
    assert not _head_processes(port)  # the Ray client server too
