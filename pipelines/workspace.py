"""The workspace (everything a run makes) and the stage mechanics: keys, reuse, atomic outputs.

A stage's output lives in `artifacts/<stage>/<key>/` with a `manifest.json` written last; the key
hashes the stage name, its code version, its own config and its inputs' keys. A finished output is
reused, never rewritten (unless forced), and a half-written one is never seen under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lm_core.typed_config import to_dict

MANIFEST = "manifest.json"


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
        con = duckdb.connect(str(self.catalog), read_only=read_only)
        try:
            yield con
        finally:
            con.close()

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.artifacts / stage / key


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
    final = ws.stage_dir(stage, key)
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
