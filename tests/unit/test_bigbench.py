"""Preparing BIG-bench tasks from a source archive laid out like bigbench-1.0.0.tar.gz (a tiny one)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from lm_core.multiple_choice import load_task
from pipelines.data import bigbench
from pipelines.workspace import Workspace

TASK = {"name": "toy", "examples": [{"input": "Is fire hot?", "target_scores": {"Yes": 1, "No": 0}}]}


def make_archive(path, tasks: dict[str, dict]):
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("bigbench-1.0.0/setup.py", b"# not a task\n")
        add(f"{bigbench.TASKS_DIR}README.md", b"# tasks\n")
        for name, task in tasks.items():
            add(f"{bigbench.TASKS_DIR}{name}/{bigbench.TASK_FILE}", json.dumps(task).encode())
            add(f"{bigbench.TASKS_DIR}{name}/README.md", b"about the task\n")
    return path


@pytest.fixture
def archive(tmp_path):
    return make_archive(tmp_path / bigbench.ARCHIVE, {
        "toy_task": TASK, "logic/three": {**TASK, "name": "three"}, "logic": {"name": "logic", "subtasks": []}})


def test_lists_and_extracts_only_the_tasks_asked_for(tmp_path, archive):
    assert bigbench.list_tasks(archive) == ["logic", "logic/three", "toy_task"]
    ws = Workspace(tmp_path / "ws")
    paths = bigbench.prepare(ws, ["toy_task", "logic/three"], archive=archive)
    assert paths == {"toy_task": bigbench.task_path(ws, "toy_task"), "logic/three": bigbench.task_path(ws, "logic/three")}
    files = sorted(p.relative_to(bigbench.cache_dir(ws)).as_posix() for p in bigbench.cache_dir(ws).rglob("*") if p.is_file())
    assert files == ["logic/three/task.json", "toy_task/task.json"]
    examples = load_task(paths["toy_task"])
    assert examples[0].choices == ["Yes", "No"] and examples[0].correct == {0}


def test_prepared_tasks_need_no_archive(tmp_path, archive):
    ws = Workspace(tmp_path / "ws")
    bigbench.prepare(ws, ["toy_task"], archive=archive)
    archive.unlink()
    # cached: no archive and no download (fetch_archive would need the network and a 360 MB file)
    assert bigbench.prepare(ws, ["toy_task"]) == {"toy_task": bigbench.task_path(ws, "toy_task")}


def test_unknown_task_names_close_matches(tmp_path, archive):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(ValueError, match=r"no BIG-bench task 'toy_tsk' \(did you mean toy_task\?\)"):
        bigbench.prepare(ws, ["toy_tsk"], archive=archive)
    assert not bigbench.cache_dir(ws).exists() or not any(bigbench.cache_dir(ws).rglob("*.json"))


def test_command_line(tmp_path, archive, capsys):
    ws = tmp_path / "ws"
    assert bigbench.main(["--workspace", str(ws), "--archive", str(archive), "toy_task"]) == 0
    assert "toy_task:" in capsys.readouterr().out
    assert bigbench.main(["--workspace", str(ws), "--archive", str(archive), "nope"]) == 2
    assert "bigbench: error: no BIG-bench task 'nope'" in capsys.readouterr().err
    assert bigbench.main(["--archive", str(archive), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["logic", "logic/three", "toy_task"]
