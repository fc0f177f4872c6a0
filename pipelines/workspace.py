"""The workspace (everything a run makes) and the stage mechanics: keys, reuse, atomic outputs.

A stage's output lives in `artifacts/<stage>/<key>/` with a `manifest.json` written last; the key
hashes the stage name, its code version, its own config and its inputs' keys. A finished output is
reused, never rewritten (unless forced), and a half-written one is never seen under its final name.

Several runs may share a workspace at once: building a (stage, key) holds that key's file lock, so a
second run waits and then reuses the output instead of building it twice, and the DuckDB catalog
(one writer process at a time) is opened under a workspace lock. The locks are `flock`s, which the
kernel drops when their process dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lm_core.typed_config import to_dict

# Rows per DuckDB row group in the catalog (DuckDB's default: 122,880). A transaction's appends are compressed and
# written to the file as each row group fills (optimistic writes), so with smaller groups ingest's load does that
# work while the workers still stage partitions, instead of all of it in one commit + checkpoint at the end
# (75 MB of text: 0.63 s serial at the default); a checkpoint with several groups also runs on several threads.
# The size is a property of the connection, not of the file: every connection here attaches with it.
CATALOG_ROW_GROUP_ROWS = 16_384

MANIFEST = "manifest.json"
log = logging.getLogger("lmforge")
# locks this process holds: path -> [fd, depth]; a nested or second-thread request for a lock the
# process already holds must not wait on itself (flock locks belong to the open file, not the process)
_held: dict[str, list[int]] = {}
_held_guard = threading.Lock()


class WorkspaceError(ValueError):
    """The workspace cannot be used as it is; the message says what to do."""


class CatalogDamaged(WorkspaceError):
    def __init__(self, path: Path, exc: Exception):
        detail = str(exc).splitlines()[0][:300]
        super().__init__(f"the catalog {path} is damaged or not a DuckDB file ({type(exc).__name__}: {detail}); "
                         "restore it from a copy, or move it away and rerun with --from ingest (the data stages "
                         "rebuild it; the stages after them run again)")


@dataclass(frozen=True)
class StageResult:
    stage: str
    key: str
    path: str  # the artifact directory
    metrics: dict[str, Any] = field(default_factory=dict)
    reused: bool = False

    @property
    def dir(self) -> Path:
        return Path(self.path)


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def latest_export_file(self) -> Path:
        return self.root / "LATEST_EXPORT"

    @contextlib.contextmanager
    def duckdb(self, read_only: bool = False) -> Iterator[Any]:
        import duckdb

        self.root.mkdir(parents=True, exist_ok=True)
        # DuckDB lets one process write a database file (and none read it meanwhile): another run in this
        # workspace waits here instead of failing with "Could not set lock on file"
        with self.lock("catalog", shared=read_only):
            con = duckdb.connect()
            path = str(self.catalog).replace("'", "''")
            mode = ", READ_ONLY" if read_only else ""
            try:
                con.execute(f"ATTACH '{path}' AS catalog (ROW_GROUP_SIZE {CATALOG_ROW_GROUP_ROWS}{mode})")
                con.execute("USE catalog")
                # where DuckDB spills: beside the catalog, as for a connection opened on the file (an in-memory
                # main database would spill to ./.tmp, wherever the user started the run)
                con.execute(f"SET temp_directory = '{path}.tmp'")
            except duckdb.Error as exc:
                con.close()
                raise CatalogDamaged(self.catalog, exc) from None
            try:
                yield con
            finally:
                con.close()

    def check(self) -> None:
        """Before any stage runs: the workspace is a directory, and its catalog (if any) opens. A fully
        cached run reads no catalog, so without this it would not notice a damaged one."""
        if self.root.exists() and not self.root.is_dir():
            raise WorkspaceError(f"workspace {self.root} is a file, not a directory; pass --workspace DIR (a new or "
                                 "existing directory) or move the file")
        if self.catalog.is_file():
            with self.duckdb(read_only=True) as con:
                con.execute("SELECT count(*) FROM information_schema.tables").fetchall()

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.artifacts / stage / key

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool = False) -> Iterator[None]:
        """Hold `locks/<name>.lock` against other processes (re-entrant within this process)."""
        self.locks.mkdir(parents=True, exist_ok=True)
        path = str(self.locks / f"{name}.lock")
        _acquire(path, shared)
        try:
            yield
        finally:
            _release(path)


def _acquire(path: str, shared: bool) -> None:
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
            return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another run in this workspace holds it", path)
            fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    with _held_guard:
        if path in _held:  # another thread took the same shared lock meanwhile: keep one file open
            _held[path][1] += 1
            os.close(fd)
        else:
            _held[path] = [fd, 1]


def _release(path: str) -> None:
    with _held_guard:
        _held[path][1] -= 1
        if _held[path][1] == 0:
            os.close(_held.pop(path)[0])  # closing the file releases the flock


def stage_key(stage: str, version: str, stage_config: Any, inputs: Sequence[StageResult] = (), extra: Any = None) -> str:
    payload = {
        "stage": stage,
        "version": version,
        "config": to_dict(stage_config),
        "inputs": [i.key for i in inputs],
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_result(ws: Workspace, stage: str, key: str) -> StageResult | None:
    """The finished output of (stage, key), or None when it is missing or incomplete."""
    final = ws.stage_dir(stage, key)
    manifest_path = final / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    for rel, size in manifest.get("files", {}).items():
        file = final / rel
        if not file.is_file() or file.stat().st_size != size["bytes"]:
            return None
    return StageResult(stage, key, str(final), manifest.get("metrics", {}), reused=True)


def run_stage(ws: Workspace, stage: str, key: str, build: Callable[[Path], dict[str, Any]], force: bool = False) -> StageResult:
    """Reuse (stage, key) if finished; otherwise build it in a temp dir and rename it into place.

    `build(out_dir)` writes its files into out_dir and returns the stage's metrics.
    """
    if not force:
        existing = load_result(ws, stage, key)
        if existing is not None:
            return existing
    with ws.lock(f"{stage}-{key}"):
        # another run may have built this key while we waited for its lock
        existing = None if force else load_result(ws, stage, key)
        return existing or _build(ws, stage, key, build)


def _build(ws: Workspace, stage: str, key: str, build: Callable[[Path], dict[str, Any]]) -> StageResult:
    final = ws.stage_dir(stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{key}-*"):  # left by a killed run: we hold the key's lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    started = time.time()
    try:
        metrics = build(tmp)
        files = {
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "stage": stage,
            "key": key,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - started, 3),
            "metrics": metrics,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if final.exists():  # forced rebuild: the old output moves aside, then goes
            trash = final.parent / f".old-{key}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StageResult(stage, key, str(final), metrics, reused=False)
