"""The continued run: new inbox files become a new snapshot, the champion trains on from its own weights with
its own tokenizer, and the gate compares old and new model on the same validation data. No new file: no run."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

from pipelines.apps import continue_run
from pipelines.config import ConfigError, load_config
from pipelines.mlflow_store import INIT_VERSION_TAG
from pipelines.stages.runner import run_pipeline

# stdlib files far down the sorted list, so the tiny config's 300 stdlib documents do not hold them
NEW_FILES = ["zipapp.py", "wave.py", "webbrowser.py"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny pipeline, run to the end: its first version is the champion."""
    root = tmp_path_factory.mktemp("continue")
    cfg = load_config("tiny", [f"workspace={root / 'ws'}", "eval.prompts=[]"])
    results = run_pipeline(cfg)
    assert results["register"].metrics["promoted"]
    return cfg, results, root


@pytest.mark.slow
def test_continue_trains_the_champion_on_new_files_and_gates_on_the_same_data(base):
    cfg, first, root = base
    inbox = root / "inbox"
    inbox.mkdir()
    assert "holds no" in continue_run.plan(cfg, inbox, tokens=20_480)  # an empty inbox: nothing to do

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in NEW_FILES:
        shutil.copyfile(stdlib / name, inbox / f"{Path(name).stem}.txt")
    plan = continue_run.plan(cfg, inbox, tokens=20_480)
    assert not isinstance(plan, str), plan
    assert sorted(Path(f).name for f in plan.new_files) == sorted(f"{Path(n).stem}.txt" for n in NEW_FILES)
    assert plan.steps == 20 and plan.champion_version == first["register"].metrics["version"]
    assert plan.cfg.train.init_from == str(plan.champion_dir) and plan.cfg.dedup.incremental

    results = run_pipeline(plan.cfg, tags=plan.tags)
    ingest = results["ingest"].metrics
    assert ingest["snapshot"] != first["ingest"].metrics["snapshot"]
    # the inbox's files (grouped into partitions of ~ingest.partition_bytes) are read; the old corpus was
    # copied in SQL, not read again
    assert 1 <= ingest["partitions_read"] <= len(NEW_FILES)
    assert ingest["documents"] > first["ingest"].metrics["documents"]
    # the champion's tokenizer, byte for byte: the ids keep their meaning
    assert results["tokenizer"].metrics["sha256"] == first["tokenizer"].metrics["sha256"]
    assert results["pretrain"].metrics["steps"] == 20 and results["pretrain"].metrics["init_from"]
    evaluate = results["evaluate"].metrics
    # it started from the champion, so it starts far below an untrained model
    assert evaluate["init_val_bpb"] < 0.8 * evaluate["untrained_val_bpb"]
    # the new documents are scored on their own too (the validation windows are a sample of the whole split)
    assert "val_bpb.inbox" in evaluate and evaluate["val_windows"] == cfg.eval.max_windows
    assert evaluate["init_val_bpb.inbox"] > 0  # the champion on the new documents alone, beside the new model
    gate = results["register"].metrics["gate"]
    assert gate["same_eval_data"] is True and gate["champion_value"] == pytest.approx(evaluate["init_val_bpb"])
    assert gate["promoted"] == (evaluate["val_bpb"] < evaluate["init_val_bpb"])
    assert results["register"].metrics["version"] != first["register"].metrics["version"]

    from mlflow import MlflowClient

    version = MlflowClient().get_model_version(cfg.register.model_name, results["register"].metrics["version"])
    assert version.tags[INIT_VERSION_TAG] == plan.champion_version

    # the same inbox again: every file is in a snapshot already
    assert "no new files" in continue_run.plan(cfg, inbox, tokens=20_480)


def test_continue_errors_name_the_fix(tmp_path):
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}"])
    with pytest.raises(ConfigError, match="create it and drop new"):
        continue_run.plan(cfg, tmp_path / "missing", tokens=1000)
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "a.txt").write_text("new text " * 50)
    assert "no lmforge-tiny@champion in the registry yet" in continue_run.plan(cfg, tmp_path / "inbox", tokens=1000)
    with pytest.raises(ConfigError, match="--tokens=0"):
        continue_run.plan(cfg, tmp_path / "inbox", tokens=0)


def test_the_continue_flow_with_nothing_new_runs_nothing(prefect_harness, tmp_path):
    # NOTE: no capsys here: Prefect's console log handler would keep the captured stream, closed after the
    # test, and every later flow in the session would fail writing to it
    from flows.continue_flow import continue_flow

    (tmp_path / "inbox").mkdir()
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}"])
    outcome = continue_flow(inbox=str(tmp_path / "inbox"), tokens=1000, config=cfg.to_dict())
    assert outcome == {"ran": False, "reason": f"the inbox {tmp_path / 'inbox'} holds no **/*.txt files: nothing to do"}
    assert not (tmp_path / "ws" / "artifacts").exists()  # no stage ran


def test_the_cli_says_why_nothing_ran(tmp_path, capsys):
    from flows.cli import main

    (tmp_path / "inbox").mkdir()
    assert main(["continue", "-c", "tiny", "--workspace", str(tmp_path / "ws"), "--inbox", str(tmp_path / "inbox"),
                 "--tokens", "1000", "--no-prefect"]) == 0
    assert "holds no **/*.txt files: nothing to do" in capsys.readouterr().out
