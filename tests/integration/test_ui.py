"""`lmforge ui` as a user runs it: a subprocess that starts the Prefect server, the MLflow UI and
TensorBoard on free ports, answers on all three health endpoints, and on Ctrl-C (SIGINT) stops every
process it started — the servers' own children included — and frees the ports."""

from __future__ import annotations

import socket
import subprocess
import time

import psutil
import pytest
from process_fixtures import HEALTH, LMFORGE, UiProcess, free_ports, port_is_free

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ui_starts_three_servers_and_ctrl_c_stops_them_all(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    ports = dict(zip(HEALTH, free_ports(3)))
    ui = UiProcess(workspace, ports)
    try:
        ui.wait_ready()
        children = psutil.Process(ui.proc.pid).children(recursive=True)
        assert len(children) >= 3, [c.cmdline() for c in children]
        # the Prefect server keeps its database in the workspace's Prefect home
        assert (workspace / "prefect" / "prefect.db").is_file()
    finally:
        out = ui.stop()
    proc = ui.proc
    for name, port in ports.items():
        assert f"http://127.0.0.1:{port}/" in out, f"{name}'s URL was not printed:\n{out}"
    assert proc.returncode == 0, out
    assert "stopped" in out
    time.sleep(1)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running after Ctrl-C: {[c.cmdline() for c in alive]}"
    assert all(port_is_free(p) for p in ports.values()), "a port is still held after Ctrl-C"


def test_ui_refuses_a_port_in_use(tmp_path):
    (tmp_path / "ws").mkdir()
    ports = dict(zip(HEALTH, free_ports(3)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["mlflow"]))
        busy.listen()
        done = subprocess.run(
            [LMFORGE, "ui", "--workspace", str(tmp_path / "ws"), "--prefect-port", str(ports["prefect"]),
             "--mlflow-port", str(ports["mlflow"]), "--tensorboard-port", str(ports["tensorboard"])],
            capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"port {ports['mlflow']}" in done.stderr and "--mlflow-port" in done.stderr
