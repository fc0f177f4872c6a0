"""lmforge commands in subprocesses for tests: a clean environment, free ports, `lmforge ui` with health
checks and Ctrl-C (test_ui, test_browser, test_deploy, test_concurrency)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

LMFORGE = str(Path(sys.executable).parent / "lmforge")
# set by an in-process training run earlier in the session (lm_core.engine.init_distributed): a child
# that inherits them would join that run's rendezvous port instead of starting its own
DISTRIBUTED_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
HEALTH = {"prefect": "/api/health", "mlflow": "/health", "tensorboard": "/data/environment"}


def lmforge(*args, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """`lmforge ARGS...` as a user runs it, in `cwd`; its output captured."""
    return subprocess.run([LMFORGE, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def child_env(drop: tuple[str, ...] = (), **values: str) -> dict[str, str]:
    """This process's environment for a child: without DISTRIBUTED_VARS and `drop`, plus `values`."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARS and k not in drop}
    return {**env, "OMP_NUM_THREADS": "1", **values}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def answers(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed health-check connections linger in TIME_WAIT
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class UiProcess:
    """`lmforge ui` in a subprocess, its output collected by a thread (so a wait never blocks on a read)."""

    def __init__(self, workspace: Path, ports: dict[str, int], extra_env: dict | None = None):
        env = child_env(drop=("PREFECT_HOME", "PREFECT_API_URL"))
        self.ports = ports
        self.proc = subprocess.Popen(
            [LMFORGE, "ui", "--workspace", str(workspace), "--prefect-port", str(ports["prefect"]),
             "--mlflow-port", str(ports["mlflow"]), "--tensorboard-port", str(ports["tensorboard"])],
            env={**env, **(extra_env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while "Ready." not in self.output or not all(answers(self.ports[n], p) for n, p in HEALTH.items()):
            assert self.proc.poll() is None, f"lmforge ui exited early:\n{self.output}"
            assert time.monotonic() < deadline, f"the three UIs did not all answer in time:\n{self.output}"
            time.sleep(1)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        return self.output
