"""Flow runs whose process was killed (kill -9, a lost machine) stay RUNNING in Prefect forever: nothing is
left to report their end. A running pipeline flow leaves a note (process id, host) in the workspace's
Prefect home; the next `lmforge run` marks the runs whose process is gone as Crashed, saying so."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from pipelines.workspace import Workspace

log = logging.getLogger("lmforge")


def _notes(ws: Workspace) -> Path:
    return ws.prefect_home / "running"


def record_running(ws: Workspace, flow_run_id: str) -> Path:
    note = _notes(ws) / f"{flow_run_id}.json"
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return note


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process holds that id now: assume alive, do not touch the run
    return True


def mark_crashed_runs(ws: Workspace) -> list[str]:
    """Mark this host's flow runs whose process is gone as Crashed (if still RUNNING); returns their ids."""
    notes = sorted(_notes(ws).glob("*.json")) if _notes(ws).is_dir() else []
    dead = []
    for note in notes:
        info = json.loads(note.read_text())
        if info.get("host") == socket.gethostname() and not _alive(int(info["pid"])):
            dead.append(note)
    if not dead:
        return []
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    marked = []
    with get_client(sync_client=True) as client:
        for note in dead:
            run_id = note.stem
            try:
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_running():
                    client.set_flow_run_state(run_id, Crashed(message=f"its process (pid {json.loads(note.read_text())['pid']}) "
                                                                      "was gone when the next lmforge run started"),
                                              force=True)
                    marked.append(run_id)
                    log.warning("flow run %s was still RUNNING but its process is gone: marked Crashed", run_id)
            except Exception as exc:  # noqa: BLE001 - a note for a run this API server does not know
                log.info("could not check flow run %s (%s); dropping its note", run_id, exc)
            note.unlink(missing_ok=True)
    return marked
