"""The whole pipeline as plain function calls on the tiny config: every stage's output, the data
accounting in DuckDB, the trained and exported model, the MLflow run and registry, and reruns.

One pipeline run per module (~20 s on 2 cores); the tests that rerun it with other arguments come
last, in file order, because they move the registry alias and rebuild the tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.stages.runner import STAGES, run_pipeline
from pipelines.workspace import MANIFEST, Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LINEAGE_KEYS = ("lmforge.config_hash", "lmforge.data_snapshot", "lmforge.tokenizer_key",
                "lmforge.shard_manifest_key", "lmforge.code_version")
# lineage tag -> the stage whose key it must equal
LINEAGE_STAGE = {"lmforge.data_snapshot": "ingest", "lmforge.dedup_key": "dedup", "lmforge.split_key": "split",
                 "lmforge.tokenizer_key": "tokenizer", "lmforge.shard_manifest_key": "shard",
                 "lmforge.pretrain_key": "pretrain", "lmforge.evaluate_key": "evaluate", "lmforge.export_key": "export"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A module temp dir; the tests run with their working directory in `cwd/` beside the workspace,
    so anything written relative to the working directory lands here, not in the repository."""
    root = tmp_path_factory.mktemp("plain")
    (root / "cwd").mkdir()
    old = os.getcwd()
    os.chdir(root / "cwd")
    try:
        yield root
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def cfg(run_dir):
    return load_config("tiny", [f"workspace={run_dir / 'ws'}"])


@pytest.fixture(scope="module")
def ws(cfg):
    return Workspace(cfg.workspace)


@pytest.fixture(scope="module")
def first(cfg):
    return run_pipeline(cfg)


@contextlib.contextmanager
def catalog(ws: Workspace):
    """A read-only connection, closed before the next pipeline call opens the catalog read-write."""
    import duckdb

    con = duckdb.connect(str(ws.catalog), read_only=True)
    try:
        yield con
    finally:
        con.close()


@pytest.fixture(scope="module")
def mlflow_client(ws, first):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(ws.mlflow_uri)
    mlflow.set_registry_uri(ws.mlflow_uri)
    return MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri)


# --- every stage -----------------------------------------------------------------------------------


def test_every_stage_has_a_finished_output(first, ws):
    assert list(first) == list(STAGES)
    for name in STAGES:
        result = first[name]
        assert result.stage == name
        assert not result.reused, f"{name} was reused in a fresh workspace"
        assert result.dir.is_dir(), f"{name}: no artifact dir {result.dir}"
        assert result.dir == ws.stage_dir(name, result.key)
        manifest = json.loads((result.dir / MANIFEST).read_text())
        assert manifest["stage"] == name and manifest["key"] == result.key
        assert manifest["metrics"] == json.loads(json.dumps(result.metrics, default=str))
        for rel, size in manifest["files"].items():
            assert (result.dir / rel).stat().st_size == size["bytes"], f"{name}: {rel} differs from its manifest"
    # no half-written outputs left behind
    assert not [p for p in ws.artifacts.rglob(".tmp-*")]


# --- data accounting -------------------------------------------------------------------------------


def test_ingest_accounts_for_every_record(first, ws):
    m = first["ingest"].metrics
    assert m["read"] == m["documents"] + m["quarantined"]
    assert m["documents"] > 0
    with catalog(ws) as con:
        docs = con.execute("SELECT count(*), count(DISTINCT doc_id) FROM documents WHERE snapshot = ?",
                           [first["ingest"].key]).fetchall()[0]
        quarantined = con.execute("SELECT count(*) FROM quarantine WHERE snapshot = ?", [first["ingest"].key]).fetchall()[0][0]
        n_bytes = con.execute("SELECT sum(n_bytes) FROM documents WHERE snapshot = ?", [first["ingest"].key]).fetchall()[0][0]
    assert docs == (m["documents"], m["documents"]), "document rows or doc_ids do not match the ingest report"
    assert quarantined == m["quarantined"]
    assert n_bytes == m["bytes"]


def test_dedup_accounts_for_every_document(first, ws):
    m, dedup_key = first["dedup"].metrics, first["dedup"].key
    assert m["read"] == first["ingest"].metrics["documents"]
    assert m["read"] == m["kept"] + m["dropped"]
    with catalog(ws) as con:
        by_status = dict(con.execute("SELECT status, count(*) FROM doc_status WHERE dedup_key = ? GROUP BY ALL",
                                     [dedup_key]).fetchall())
        kept_rows_with_reason = con.execute(
            "SELECT count(*) FROM doc_status WHERE dedup_key = ? AND status = 'kept' AND (reason IS NOT NULL OR duplicate_of IS NOT NULL)",
            [dedup_key]).fetchall()[0][0]
        dropped = con.execute(
            """SELECT s.doc_id, s.reason, s.duplicate_of,
                      lower(regexp_replace(trim(d.text), '\\s+', ' ', 'g')),
                      lower(regexp_replace(trim(o.text), '\\s+', ' ', 'g')), os.status
               FROM doc_status s
               JOIN documents d ON d.snapshot = s.snapshot AND d.doc_id = s.doc_id
               LEFT JOIN documents o ON o.snapshot = s.snapshot AND o.doc_id = s.duplicate_of
               LEFT JOIN doc_status os ON os.dedup_key = s.dedup_key AND os.doc_id = s.duplicate_of
               WHERE s.dedup_key = ? AND s.status = 'dropped'""", [dedup_key]).fetchall()
        unaccounted = con.execute(
            """SELECT count(*) FROM documents d WHERE d.snapshot = ? AND NOT EXISTS
               (SELECT 1 FROM doc_status s WHERE s.dedup_key = ? AND s.doc_id = d.doc_id)""",
            [first["ingest"].key, dedup_key]).fetchall()[0][0]
    assert by_status == {k: v for k, v in {"kept": m["kept"], "dropped": m["dropped"]}.items() if v}
    assert unaccounted == 0
    assert kept_rows_with_reason == 0
    assert len(dropped) == m["dropped"]
    for doc_id, reason, duplicate_of, text, original_text, original_status in dropped:
        assert reason, f"dropped {doc_id} has no reason"
        if reason.startswith("quality:"):  # a quality rule names no original
            assert duplicate_of is None
            continue
        assert reason in ("exact_duplicate", "near_duplicate"), reason
        assert duplicate_of and duplicate_of != doc_id, f"dropped {doc_id} names no original"
        assert original_status == "kept", f"{doc_id} duplicates {duplicate_of}, which is not kept"
        if reason == "exact_duplicate":  # the same text once case and whitespace are normalized
            assert text == original_text
    assert sum(m["dropped_by_reason"].values()) == m["dropped"]


def test_split_covers_exactly_the_kept_documents(first, ws):
    m = first["split"].metrics
    assert m["train_docs"] > 0 and m["val_docs"] > 0
    assert m["train_docs"] + m["val_docs"] == first["dedup"].metrics["kept"]
    with catalog(ws) as con:
        split_ids = con.execute("SELECT doc_id FROM splits WHERE split_key = ?", [first["split"].key]).fetchall()
        kept_ids = con.execute("SELECT doc_id FROM doc_status WHERE dedup_key = ? AND status = 'kept'",
                               [first["dedup"].key]).fetchall()
    assert len(split_ids) == len(set(split_ids)), "a document is in more than one split"
    assert set(split_ids) == set(kept_ids)


def test_shard_index_totals_match_the_split_and_the_tokenizer(first, ws):
    from lm_core.shards import INDEX_FILE, open_split
    from lm_core.tokenizer import Tokenizer
    from pipelines.data import catalog as catalog_queries
    from pipelines.stages.tokenizer import model_path

    shard, split = first["shard"], first["split"]
    index = json.loads((shard.dir / INDEX_FILE).read_text())
    tok = Tokenizer(model_path(first["tokenizer"]))
    assert index["tokenizer_sha256"] == tok.sha256 == first["tokenizer"].metrics["sha256"]
    with catalog(ws) as con:
        for name in ("train", "val"):
            totals = index["totals"][name]
            assert totals["num_docs"] == split.metrics[f"{name}_docs"]
            assert totals["num_bytes"] == split.metrics[f"{name}_bytes"]
            assert totals["num_tokens"] == sum(s["num_tokens"] for s in index["shards"] if s["split"] == name)
            assert shard.metrics[f"{name}_num_tokens"] == totals["num_tokens"]
            arrays = open_split(shard.dir, name, tok.sha256)  # checks every file's sha256 and length
            assert sum(a.size for a in arrays) == totals["num_tokens"]
            # the shards hold exactly [bos, ids..., eos] of each document of the split
            texts = [text for batch in catalog_queries.split_texts(con, split.key, name) for _, text in batch]
            assert totals["num_tokens"] == sum(len(ids) + 2 for ids in tok.encode_batch(texts))
            assert sum(int((a == tok.bos_id).sum()) for a in arrays) == len(texts)


# --- model -----------------------------------------------------------------------------------------


def test_training_beats_the_untrained_model(first, cfg):
    from pipelines.stages.evaluate import prompt_sampling

    m = first["evaluate"].metrics
    assert 0 < m["val_bpb"] < m["untrained_val_bpb"]
    assert m["val_loss"] < m["untrained_val_loss"]
    assert first["pretrain"].metrics["steps"] == 30
    samples = json.loads((first["evaluate"].dir / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["def ", "import "]
    assert all(isinstance(s["completion"], str) for s in samples)
    seeds = [s["seed"] for s in samples]  # one seed per prompt, derived from eval.sampling.seed
    assert len(set(seeds)) == 2 and seeds == [prompt_sampling(cfg.eval.sampling, p).seed for p in ("def ", "import ")]


def test_export_is_self_contained_with_lineage(first, cfg, ws):
    from lm_core.generate import SamplingConfig, generate
    from lm_core.tokenizer import Tokenizer
    from lm_core.weights import load_model_dir

    export = first["export"].dir
    for name in ("model.safetensors", "tokenizer.model", "config.json"):
        assert (export / name).is_file(), f"export lacks {name}"
    config = json.loads((export / "config.json").read_text())
    lineage = config["lineage"]
    for tag in LINEAGE_KEYS:
        assert lineage.get(tag), f"config.json lineage lacks {tag}"
    assert lineage["lmforge.config_hash"] == cfg.config_hash()
    for tag, stage in LINEAGE_STAGE.items():
        if tag in lineage:
            assert lineage[tag] == first[stage].key, f"{tag} does not name the {stage} output"
    assert ws.latest_export_file.read_text().strip() == str(export)

    model, meta = load_model_dir(export)
    assert meta["model"]["n_layer"] == cfg.model.n_layer
    tok = Tokenizer(export / "tokenizer.model")
    assert tok.sha256 == first["tokenizer"].metrics["sha256"]
    ids = generate(model, tok.encode("def "), SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=20, seed=1))
    assert 0 < len(ids) <= 8
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert isinstance(tok.decode(ids), str)
    # the same seed gives the same text
    assert generate(model, tok.encode("def "), SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=20, seed=1)) == ids


# --- MLflow ----------------------------------------------------------------------------------------


def test_registered_version_has_alias_and_lineage_tags(first, cfg, mlflow_client):
    reg = first["register"].metrics
    assert reg["model_name"] == cfg.register.model_name and reg["version"] == "1"
    mv = mlflow_client.get_model_version_by_alias(cfg.register.model_name, cfg.register.alias)
    assert str(mv.version) == "1"
    assert mv.run_id == reg["run_id"]
    for tag in LINEAGE_KEYS:
        assert mv.tags.get(tag), f"model version lacks tag {tag}"
    for tag, stage in LINEAGE_STAGE.items():
        assert mv.tags.get(tag) == first[stage].key, f"version tag {tag} does not name the {stage} output"
    assert mv.tags["lmforge.mlflow_run_id"] == reg["run_id"]
    assert mv.tags["lmforge.config_hash"] == cfg.config_hash()


def test_run_has_params_metric_history_and_artifacts(first, cfg, mlflow_client):
    run_id = first["register"].metrics["run_id"]
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "30"
    assert run.data.params["model.n_layer"] == str(cfg.model.n_layer)
    assert "workspace" not in run.data.params  # where the run lived is not a property of the model
    assert run.data.tags["lmforge.data_snapshot"] == first["ingest"].key
    assert run.data.metrics["eval.val_bpb"] == pytest.approx(first["evaluate"].metrics["val_bpb"])

    history = mlflow_client.get_metric_history(run_id, "train/loss")
    assert len(history) > 1
    steps = [m.step for m in history]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), f"train/loss steps {steps}"
    assert 0 < max(steps) <= cfg.train.max_steps
    assert len(mlflow_client.get_metric_history(run_id, "val/loss")) >= 1

    top = {a.path: a for a in mlflow_client.list_artifacts(run_id)}
    assert "samples.json" in top and "config.yaml" in top
    for folder in ("tokenizer", "tensorboard"):
        assert folder in top and top[folder].is_dir, f"run artifacts lack {folder}/"
    assert [a.path for a in mlflow_client.list_artifacts(run_id, "tokenizer")] == ["tokenizer/tokenizer.model"]
    assert any("tfevents" in a.path for a in mlflow_client.list_artifacts(run_id, "tensorboard"))


def test_pyfunc_model_is_logged_by_the_run(first, cfg, mlflow_client):
    """MLflow 3 stores `log_model(name='model')` as a LoggedModel beside the run (not under the run's
    own artifact list); the registered version points at it."""
    run_id = first["register"].metrics["run_id"]
    run = mlflow_client.get_run(run_id)
    logged_models = mlflow_client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                       filter_string=f"source_run_id = '{run_id}'")
    assert [m.name for m in logged_models] == ["model"]
    logged = logged_models[0]
    mv = mlflow_client.get_model_version(cfg.register.model_name, "1")
    assert mv.source == f"models:/{logged.model_id}", "the registered version is not the run's logged model"
    files = {Path(a.path).name for a in mlflow_client.list_logged_model_artifacts(logged.model_id)}
    assert "MLmodel" in files
    assert "artifacts" in files  # holds model_dir: the export


def test_registered_model_generates_through_pyfunc(first, cfg, mlflow_client):
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/{cfg.register.model_name}@{cfg.register.alias}")
    out = model.predict(pd.DataFrame({"prompt": ["def "]}))
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    two = model.predict(pd.DataFrame({"prompt": ["def ", "import "]}), params={"max_new_tokens": 4, "seed": 0})
    assert len(two) == 2 and all(isinstance(t, str) for t in two)


def test_mlflow_artifacts_live_inside_the_workspace(first, ws, mlflow_client, run_dir):
    """Not MLflow's default ./mlruns in the working directory (the module runs from a temp cwd)."""
    run_id = first["register"].metrics["run_id"]
    run = mlflow_client.get_run(run_id)
    experiment = mlflow_client.get_experiment(run.info.experiment_id)
    logged = mlflow_client.search_logged_models(experiment_ids=[experiment.experiment_id],
                                                filter_string=f"source_run_id = '{run_id}'")
    assert not (run_dir / "cwd" / "mlruns").exists(), "MLflow wrote ./mlruns in the working directory"
    for uri in (run.info.artifact_uri, experiment.artifact_location, *(m.artifact_location for m in logged)):
        path = Path(uri.removeprefix("file://"))
        assert path.is_relative_to(ws.root), f"MLflow writes artifacts to {path}, outside the workspace {ws.root}"


# --- reruns (these change the workspace: keep them last) ---------------------------------------------


def test_rerun_reuses_every_stage_and_registers_nothing(first, cfg, mlflow_client):
    again = run_pipeline(cfg)
    assert list(again) == list(STAGES)
    for name in STAGES:
        assert again[name].reused, f"{name} ran again on an unchanged config"
        assert again[name].key == first[name].key
        assert again[name].metrics == json.loads(json.dumps(first[name].metrics, default=str))
    versions = mlflow_client.search_model_versions(f"name='{cfg.register.model_name}'")
    assert [str(v.version) for v in versions] == ["1"]


def test_changing_train_steps_retrains_but_reuses_the_data_stages(first, cfg, mlflow_client):
    changed_cfg = load_config("tiny", [f"workspace={cfg.workspace}", "train.max_steps=31"])
    changed = run_pipeline(changed_cfg)
    for name in ("ingest", "dedup", "split", "tokenizer", "shard"):
        assert changed[name].reused, f"{name} ran again though only train.max_steps changed"
        assert changed[name].key == first[name].key
    for name in ("pretrain", "evaluate", "export", "register"):
        assert not changed[name].reused, f"{name} was reused though train.max_steps changed"
        assert changed[name].key != first[name].key
    assert changed["pretrain"].metrics["steps"] == 31
    assert changed["register"].metrics["version"] == "2"
    names = cfg.register.model_name
    assert sorted(str(v.version) for v in mlflow_client.search_model_versions(f"name='{names}'")) == ["1", "2"]
    mv = mlflow_client.get_model_version_by_alias(names, cfg.register.alias)
    assert str(mv.version) == "2"
    assert mv.tags["lmforge.config_hash"] == changed_cfg.config_hash() != cfg.config_hash()
    assert mv.tags["lmforge.data_snapshot"] == first["ingest"].key  # same data as version 1
    run = mlflow_client.get_run(changed["register"].metrics["run_id"])
    assert run.data.params["train.max_steps"] == "31"


def test_only_tokenizer_forces_just_the_tokenizer(first, cfg):
    only = run_pipeline(cfg, only="tokenizer")
    assert list(only) == ["ingest", "dedup", "split", "tokenizer"]
    assert all(only[name].reused for name in ("ingest", "dedup", "split"))
    assert not only["tokenizer"].reused
    assert only["tokenizer"].key == first["tokenizer"].key
    assert only["tokenizer"].metrics["vocab_size"] == cfg.tokenizer.vocab_size


def test_training_after_a_forced_tokenizer_rebuild(first, cfg):
    """A forced rebuild must give a tokenizer the shards of the same key still match (SentencePiece
    used to store its temp model_prefix path in the model file, so every rebuild had a new sha256)."""
    run_pipeline(cfg, only="tokenizer")
    retrained = run_pipeline(load_config("tiny", [f"workspace={cfg.workspace}", "train.max_steps=12"]))
    assert retrained["pretrain"].metrics["steps"] == 12
    assert not retrained["pretrain"].reused
