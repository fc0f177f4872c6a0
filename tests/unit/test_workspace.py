"""Unit tests for pipelines.workspace: stage keys, reuse, forced rebuilds and atomic outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from pipelines.workspace import MANIFEST, StageResult, Workspace, load_result, run_stage, stage_key


@dataclass
class Knobs:
    size: int = 1
    name: str = "a"


def result(key: str) -> StageResult:
    return StageResult("up", key, "/nowhere")


def test_stage_key_is_stable_and_sensitive():
    base = stage_key("s", "1", Knobs(), [result("k1")], extra=["f", 3])
    assert base == stage_key("s", "1", Knobs(), [result("k1")], extra=["f", 3])
    assert len(base) == 16 and int(base, 16) >= 0
    changed = [
        stage_key("t", "1", Knobs(), [result("k1")], extra=["f", 3]),  # another stage
        stage_key("s", "2", Knobs(), [result("k1")], extra=["f", 3]),  # code version
        stage_key("s", "1", Knobs(size=2), [result("k1")], extra=["f", 3]),  # config
        stage_key("s", "1", Knobs(name="b"), [result("k1")], extra=["f", 3]),
        stage_key("s", "1", Knobs(), [result("k2")], extra=["f", 3]),  # an input's key
        stage_key("s", "1", Knobs(), [result("k1"), result("k3")], extra=["f", 3]),
        stage_key("s", "1", Knobs(), [result("k1")], extra=["f", 4]),  # extra (e.g. source fingerprint)
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_stage_key_ignores_input_paths_and_metrics():
    a = StageResult("up", "k1", "/one", {"n": 1})
    b = StageResult("up", "k1", "/two", {"n": 2}, reused=True)
    assert stage_key("s", "1", Knobs(), [a]) == stage_key("s", "1", Knobs(), [b])


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws")


def writer(calls: list, text: str = "hello"):
    def build(out):
        calls.append(out)
        (out / "data.txt").write_text(text)
        (out / "sub").mkdir()
        (out / "sub" / "more.bin").write_bytes(b"\x00" * 10)
        return {"count": len(calls)}

    return build


def test_run_stage_builds_once_then_reuses(ws):
    calls: list = []
    first = run_stage(ws, "stage", "k", writer(calls))
    assert not first.reused and first.metrics == {"count": 1}
    assert first.dir == ws.artifacts / "stage" / "k"
    assert (first.dir / "data.txt").read_text() == "hello"
    manifest = json.loads((first.dir / MANIFEST).read_text())
    assert manifest["files"] == {"data.txt": {"bytes": 5}, "sub/more.bin": {"bytes": 10}}
    assert manifest["stage"] == "stage" and manifest["key"] == "k" and manifest["metrics"] == {"count": 1}

    second = run_stage(ws, "stage", "k", writer(calls))
    assert len(calls) == 1
    assert second.reused and second.metrics == {"count": 1} and second.path == first.path


def test_force_rebuilds(ws):
    calls: list = []
    run_stage(ws, "stage", "k", writer(calls, "old"))
    forced = run_stage(ws, "stage", "k", writer(calls, "new"), force=True)
    assert len(calls) == 2 and not forced.reused and forced.metrics == {"count": 2}
    assert (forced.dir / "data.txt").read_text() == "new"
    assert sorted(p.name for p in (ws.artifacts / "stage").iterdir()) == ["k"]  # no .old-* or .tmp-* left


def test_build_runs_in_a_temp_dir_not_the_final_one(ws):
    calls: list = []
    run_stage(ws, "stage", "k", writer(calls))
    assert calls[0] != ws.stage_dir("stage", "k")
    assert calls[0].parent == ws.artifacts / "stage" and calls[0].name.startswith(".tmp-k-")


def test_failed_build_leaves_nothing(ws):
    def broken(out):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage(ws, "stage", "k", broken)
    assert not ws.stage_dir("stage", "k").exists()
    assert list((ws.artifacts / "stage").iterdir()) == []
    assert load_result(ws, "stage", "k") is None
    # the next attempt builds from scratch
    calls: list = []
    assert not run_stage(ws, "stage", "k", writer(calls)).reused and len(calls) == 1


def test_failed_forced_rebuild_keeps_the_old_output(ws):
    run_stage(ws, "stage", "k", writer([], "old"))

    def broken(out):
        raise ValueError("nope")

    with pytest.raises(ValueError):
        run_stage(ws, "stage", "k", broken, force=True)
    kept = load_result(ws, "stage", "k")
    assert kept is not None and (kept.dir / "data.txt").read_text() == "old"


def test_changed_file_size_invalidates_the_output(ws):
    calls: list = []
    done = run_stage(ws, "stage", "k", writer(calls))
    assert load_result(ws, "stage", "k") is not None
    (done.dir / "sub" / "more.bin").write_bytes(b"\x00" * 11)
    assert load_result(ws, "stage", "k") is None
    rebuilt = run_stage(ws, "stage", "k", writer(calls))
    assert len(calls) == 2 and not rebuilt.reused
    assert (rebuilt.dir / "sub" / "more.bin").stat().st_size == 10


def test_missing_file_or_manifest_invalidates_the_output(ws):
    done = run_stage(ws, "stage", "k", writer([]))
    (done.dir / "data.txt").unlink()
    assert load_result(ws, "stage", "k") is None
    done = run_stage(ws, "stage", "k2", writer([]))
    (done.dir / MANIFEST).unlink()
    assert load_result(ws, "stage", "k2") is None


def test_workspace_paths(tmp_path):
    ws = Workspace(tmp_path / "w")
    assert ws.root.is_absolute()
    assert ws.catalog == ws.root / "catalog.duckdb"
    assert ws.stage_dir("ingest", "abc") == ws.root / "artifacts" / "ingest" / "abc"
    assert ws.mlflow_uri == f"sqlite:///{ws.root / 'mlflow' / 'mlflow.db'}"


def test_duckdb_catalog_in_the_workspace(tmp_path):
    ws = Workspace(tmp_path / "fresh")
    with ws.duckdb() as con:
        con.execute("CREATE TABLE t AS SELECT 42 AS x")
    with ws.duckdb() as con:
        assert con.execute("SELECT x FROM t").fetchall() == [(42,)]
    assert ws.catalog.is_file()


def test_catalog_connections_use_small_row_groups_and_spill_beside_the_catalog(tmp_path, monkeypatch):
    """Every catalog connection attaches with CATALOG_ROW_GROUP_ROWS (ingest's load writes full row groups while
    the workers stage; checkpoints run on several threads) and spills next to the catalog, not into ./.tmp of
    wherever the run was started."""
    from pipelines.workspace import CATALOG_ROW_GROUP_ROWS

    monkeypatch.chdir(tmp_path)
    ws = Workspace(tmp_path / "w")
    rows = 3 * CATALOG_ROW_GROUP_ROWS
    with ws.duckdb() as con:
        con.execute(f"CREATE TABLE t AS SELECT range AS i FROM range({rows})")
        assert con.execute("SELECT current_setting('temp_directory')").fetchall() == [(f"{ws.catalog}.tmp",)]
    with ws.duckdb(read_only=True) as con:
        groups = con.execute("SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('t')").fetchall()[0][0]
        assert groups == 3
