"""`lmforge ui`: the three UIs of a workspace on 127.0.0.1, started together and stopped together.

- Prefect server + UI, on the workspace's Prefect home (the database `lmforge run` records flow runs in)
- MLflow UI on the workspace's SQLite store, one worker, no job-execution workers
- TensorBoard on the workspace's `tensorboard/`

Each server runs in its own process group (they start children of their own: uvicorn, TensorBoard's
data server), so stopping one means signalling its group: SIGTERM, a grace period, then SIGKILL.
Their output goes to `logs/ui-<name>.log` in the workspace.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lm_core.typed_config import ConfigError
from pipelines.workspace import Workspace

HOST = "127.0.0.1"
STOP_GRACE_S = 15.0


@dataclass
class Server:
    name: str
    port_flag: str
    port: int
    argv: list[str]
    env: dict[str, str]
    health_path: str  # answers 200 once the server is up
    page: str = "/"
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.page}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}{self.health_path}", timeout=2) as response:
                return response.status == 200
        except (OSError, ValueError):
            return False


def servers(ws: Workspace, prefect_port: int, mlflow_port: int, tensorboard_port: int) -> list[Server]:
    bin_dir = Path(sys.executable).parent  # the venv's console scripts sit next to its python
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    prefect_env = {**env, "PREFECT_HOME": str(ws.prefect_home),
                   "PREFECT_UI_API_URL": f"http://{HOST}:{prefect_port}/api"}
    prefect_env.pop("PREFECT_API_URL", None)  # the server is the API; a client URL here points elsewhere
    return [
        Server("prefect", "--prefect-port", prefect_port,
               [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
               prefect_env, "/api/health"),
        Server("mlflow", "--mlflow-port", mlflow_port,
               [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", ws.mlflow_uri, "--host", HOST,
                "--port", str(mlflow_port), "--workers", "1"],
               {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, "/health"),
        Server("tensorboard", "--tensorboard-port", tensorboard_port,
               [str(bin_dir / "tensorboard"), "--logdir", str(ws.tensorboard), "--host", HOST,
                "--port", str(tensorboard_port)],
               env, "/data/environment"),
    ]


def check_ports_free(group: list[Server]) -> None:
    for server in group:
        with socket.socket() as sock:
            # as the servers bind: connections of a previous run lingering in TIME_WAIT don't block the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, server.port))
            except OSError:
                raise ConfigError(f"port {server.port} on {HOST} is in use (the {server.name} UI wants it); "
                                  f"stop what holds it or pass another {server.port_flag}") from None


def start(group: list[Server], logs: Path) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    for server in group:
        with open(logs / f"ui-{server.name}.log", "ab") as log:
            server.process = subprocess.Popen(server.argv, env=server.env, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(group: list[Server], timeout: float, stopping: threading.Event, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(group)
    while waiting and not stopping.is_set():
        for server in list(waiting):
            if server.process.poll() is not None:
                raise RuntimeError(f"the {server.name} server exited with code {server.process.returncode}; "
                                   f"see {logs / f'ui-{server.name}.log'}")
            if server.healthy():
                print(f"  {server.name:<12} {server.url}", flush=True)
                waiting.remove(server)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(s.name for s in waiting)
            raise RuntimeError(f"{names} did not answer within {timeout:.0f} s; see the logs in {logs} "
                               "or pass a longer --timeout")
        stopping.wait(0.5)


def stop(group: list[Server], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every server's process group, wait up to `grace` seconds, then SIGKILL what is left."""
    running = [s for s in group if s.process is not None]
    for server in running:
        _signal_group(server.process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for server in running:
        try:
            server.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for server in running:  # the group may hold children that outlive their parent
        _signal_group(server.process, signal.SIGKILL)
        server.process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # start_new_session=True: the group id is the child's pid
    except ProcessLookupError:
        pass


def main(args: argparse.Namespace) -> int:
    ws = Workspace(args.workspace)
    ws.check()  # a file, or a damaged catalog, is an error; a workspace that does not exist yet is created
    ws.root.mkdir(parents=True, exist_ok=True)  # so the UIs can be watched while a first run fills it
    group = servers(ws, args.prefect_port, args.mlflow_port, args.tensorboard_port)
    check_ports_free(group)
    ws.mlflow_dir.mkdir(parents=True, exist_ok=True)
    ws.tensorboard.mkdir(parents=True, exist_ok=True)
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    logs = ws.root / "logs"
    crashed = False
    print(f"lmforge ui for {ws.root} (logs in {logs}); starting…", flush=True)
    try:
        start(group, logs)
        wait_healthy(group, args.timeout, stopping, logs)
        if not stopping.is_set():
            print(f"Ready. Deployments: export PREFECT_API_URL=http://{HOST}:{args.prefect_port}/api; "
                  "Ctrl-C stops all three.", flush=True)
        while not stopping.is_set():
            for server in group:
                if server.process.poll() is not None:
                    print(f"lmforge ui: the {server.name} server exited (code {server.process.returncode}); "
                          f"stopping the others; see {logs / f'ui-{server.name}.log'}", file=sys.stderr)
                    crashed = True
                    stopping.set()
                    break
            stopping.wait(1.0)
    except RuntimeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("lmforge ui: stopping…", flush=True)
        stop(group)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("lmforge ui: stopped", flush=True)
    return 1 if crashed else 0
