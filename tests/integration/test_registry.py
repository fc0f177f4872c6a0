"""The registry end to end on the tiny config: the Hugging Face export of the trained model, the
promotion gate (first version champion, a worse one refused), `lmforge models`, and
`mlflow models serve -m models:/NAME@champion` answering a request.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.stages.runner import run_pipeline
from pipelines.workspace import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def cfg(root):
    return load_config("tiny", [f"workspace={root / 'ws'}"])


@pytest.fixture(scope="module")
def first(cfg):
    return run_pipeline(cfg)


@pytest.fixture(scope="module")
def worse(cfg, first):
    """A second model trained for 3 steps instead of 30: its val_bpb is clearly higher."""
    return run_pipeline(load_config("tiny", [f"workspace={cfg.workspace}", "train.max_steps=3", "train.warmup_steps=1"]))


@pytest.fixture(scope="module")
def client(cfg, first):
    from mlflow import MlflowClient

    uri = Workspace(cfg.workspace).mlflow_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def aliases_of(client, cfg) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(cfg.register.model_name).aliases.items()}


def lmforge(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lmforge"), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_export_has_a_hugging_face_layout_that_matches_the_trained_model(first):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_core.tokenizer import Tokenizer
    from lm_core.weights import load_model_dir
    from pipelines.stages.export import hf_dir

    export = first["export"]
    assert export.metrics["hf_layout"] == "hf"
    hf_path = hf_dir(export)
    ours, _ = load_model_dir(export.dir)
    tok = Tokenizer(export.dir / "tokenizer.model")
    hf = AutoModelForCausalLM.from_pretrained(str(hf_path), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(hf_path))
    text = "def main(argv):\n    return 0\n"
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text, bos=True)
    with torch.no_grad():
        diff = (hf(torch.tensor([ids])).logits - ours(torch.tensor([ids]))[0]).abs().max().item()
    assert diff < 1e-4
    card = (export.dir / "README.md").read_text()
    for heading in ("## Data lineage", "## Training config", "AutoModelForCausalLM"):
        assert heading in card
    assert first["shard"].key in card


def test_gpt2_style_model_skips_the_hugging_face_layout(cfg, first):
    from pipelines.stages.export import hf_dir

    other = run_pipeline(load_config("tiny", [f"workspace={cfg.workspace}", "model.mlp=gelu", "train.max_steps=2",
                                      "train.warmup_steps=1"]),
                         only="export")
    assert other["export"].metrics["hf_layout"].startswith("skipped: model.mlp='gelu'")
    assert hf_dir(other["export"]) is None
    assert "No Hugging Face layout" in (other["export"].dir / "README.md").read_text()


def test_first_version_becomes_champion(first, cfg, client):
    reg = first["register"].metrics
    assert reg["version"] == "1" and reg["promoted"] is True and reg["champion"] == "1"
    assert "first version" in reg["gate"]["reason"]
    assert aliases_of(client, cfg) == {"candidate": "1", "champion": "1"}
    reg_file = json.loads((first["register"].dir / "registration.json").read_text())
    assert reg_file["gate"]["value"] == pytest.approx(first["evaluate"].metrics["val_bpb"])


def test_worse_model_is_candidate_but_not_champion(first, worse, cfg, client):
    reg = worse["register"].metrics
    assert reg["version"] == "2" and reg["promoted"] is False and reg["champion"] == "1"
    gate = reg["gate"]
    assert gate["value"] == pytest.approx(worse["evaluate"].metrics["val_bpb"])
    assert gate["champion_value"] == pytest.approx(first["evaluate"].metrics["val_bpb"])
    assert gate["value"] > gate["champion_value"] and gate["same_eval_data"] is True
    assert aliases_of(client, cfg) == {"candidate": "2", "champion": "1"}
    tags = client.get_model_version(cfg.register.model_name, "2").tags
    assert tags["lmforge.gate.decision"] == "refused"
    assert float(tags["lmforge.gate.champion_value"]) == pytest.approx(gate["champion_value"])
    assert float(tags["lmforge.gate.value"]) == pytest.approx(gate["value"])


def test_each_stage_has_a_nested_run(first, client):
    run_id = first["register"].metrics["run_id"]
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    by_stage = {r.data.tags["lmforge.stage"]: r for r in children}
    assert set(by_stage) == {"ingest", "dedup", "split", "tokenizer", "shard", "pretrain", "evaluate", "export"}
    assert by_stage["pretrain"].data.params["key"] == first["pretrain"].key
    assert by_stage["evaluate"].data.metrics["val_bpb"] == pytest.approx(first["evaluate"].metrics["val_bpb"])
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/samples.json"]


def test_evaluate_scores_tasks_text_files_and_training_overlap(first, cfg, root):
    import re

    from lm_core.shards import open_split
    from lm_core.tokenizer import Tokenizer
    from pipelines.data import bigbench
    from pipelines.stages import evaluate as evaluate_stage
    from pipelines.stages.tokenizer import model_path

    tok = Tokenizer(model_path(first["tokenizer"]))
    train_text = tok.decode(open_split(first["shard"].dir, "train", tok.sha256)[0][:4000].tolist())
    seen = [line for line in train_text.splitlines() if len(re.findall(r"\w+", line)) >= 10][:3]
    assert len(seen) == 3
    task = root / "seen.jsonl"
    records = [{"context": line, "choices": [" yes", " no"], "answer": 0} for line in seen]
    records.append({"context": "zebra quantum marmalade lighthouse oboe never appears in code", "choices": ["a", "b"], "answer": 1})
    task.write_text("".join(json.dumps(r) + "\n" for r in records))
    ws = Workspace(cfg.workspace)
    cached = bigbench.task_path(ws, "toy/sub")  # as `python -m pipelines.data.bigbench toy/sub` leaves it
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps({"examples": [{"input": "x?", "target_scores": {"p": 1, "q": 0, "r": 0}}] * 5}))
    text_file = root / "extra.txt"
    text_file.write_text(tok.decode(open_split(first["shard"].dir, "val", tok.sha256)[0][:600].tolist()))

    with_tasks = load_config("tiny", [f"workspace={cfg.workspace}", f"eval.texts=[{text_file}]",
                                      f"eval.tasks=[{{name: seen, path: {task}}}, {{bigbench: toy/sub, max_examples: 3}}]"])
    result = evaluate_stage.run(with_tasks, ws, first["pretrain"], first["shard"], first["tokenizer"])
    m = result.metrics
    assert m["val_bpb"] == first["evaluate"].metrics["val_bpb"]  # the validation numbers do not move
    assert m["mc.seen.n"] == 4 and m["mc.seen.overlap_fraction"] == 0.75  # three contexts are training text
    assert m["mc.toy.sub.n"] == 3 and m["mc.toy.sub.chance"] == pytest.approx(1 / 3)
    for name in ("seen", "toy.sub"):
        assert m[f"mc.{name}.acc_ci_low"] <= m[f"mc.{name}.acc"] <= m[f"mc.{name}.acc_ci_high"]
    assert 0 < m["text.extra.bpb"] < m["untrained_val_bpb"]
    rows = evaluate_stage.task_rows(result)
    assert [r["task"] for r in rows] == ["seen", "toy.sub"] and rows[0]["overlapping_examples"] == 3
    task.write_text(task.read_text().replace("zebra", "giraffe"))  # a changed task file is a new evaluation
    assert evaluate_stage.key(with_tasks, first["pretrain"], first["shard"], first["tokenizer"]) != result.key


def test_models_cli_lists_shows_and_promotes(worse, cfg, root):
    ws, name = cfg.workspace, cfg.register.model_name
    listed = lmforge("models", "list", "--workspace", ws, cwd=root)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [(name, "1", "champion"), (name, "2", "candidate")]
    assert "refused" in listed.stdout and "promoted" in listed.stdout

    # the rest in-process but one: each `lmforge models` process spends seconds importing mlflow
    from pipelines.apps import models as models_cli

    shown = models_cli.format_show(models_cli.show(Workspace(ws), f"{name}@candidate"))
    assert shown.startswith(f"{name} version 2")
    assert "gate: refused" in shown and "lmforge.shard_manifest_key" in shown

    promoted = lmforge("models", "promote", name, "2", "--workspace", ws, cwd=root)
    assert promoted.returncode == 0, promoted.stderr
    assert "version 2 (was 1)" in promoted.stdout
    assert models_cli.show(Workspace(ws), name)["version"] == "2"  # NAME alone: its champion
    tags = models_cli.show(Workspace(ws), f"{name}/2")["tags"]
    assert tags["lmforge.gate.decision"] == "promoted by hand" and "(champion was v1)" in tags["lmforge.gate.reason"]
    assert models_cli.promote(Workspace(ws), name, "1") == {"name": name, "alias": "champion", "version": "1",
                                                            "previous": "2"}  # back, for the serve test
    with pytest.raises(models_cli.RegistryError, match="has no version '9'"):
        models_cli.show(Workspace(ws), f"{name}/9")
    with pytest.raises(models_cli.RegistryError, match="has no alias 'gold'; its aliases: candidate, champion"):
        models_cli.show(Workspace(ws), f"{name}@gold")
    with pytest.raises(models_cli.RegistryError, match="no registered model 'nope'; registered models: lmforge-tiny"):
        models_cli.list_versions(Workspace(ws), "nope")
    with pytest.raises(models_cli.RegistryError, match="no MLflow registry"):
        models_cli.list_versions(Workspace(root / "nowhere"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_serves_the_champion(first, worse, cfg, root):
    ws = Workspace(cfg.workspace)
    port = free_port()
    # mlflow runs `uvicorn` by name: the venv's bin must be on PATH (as it is in an activated venv)
    env = {**os.environ, "MLFLOW_TRACKING_URI": ws.mlflow_uri, "MLFLOW_REGISTRY_URI": ws.mlflow_uri,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (root / "serve.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{cfg.register.model_name}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"server exited:\n{(root / 'serve.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /ping in 120 s:\n{(root / 'serve.log').read_text()[-3000:]}"
            time.sleep(0.5)
        def ask(params: dict) -> list[str]:
            body = json.dumps({"dataframe_records": [{"prompt": "def "}, {"prompt": "import "}], "params": params})
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                return json.loads(r.read())["predictions"]

        answers = [ask({"max_new_tokens": 6, "seed": 3}), ask({"max_new_tokens": 6, "seed": 3}),
                   ask({"max_new_tokens": 1, "temperature": 0.0})]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    # the champion (version 1: the export of `first`) through lm_core's generation loop, with the request's params
    from lm_core.generate import SamplingConfig, generate
    from lm_core.tokenizer import Tokenizer
    from lm_core.weights import load_model_dir

    model, _ = load_model_dir(first["export"].dir)
    tok = Tokenizer(first["export"].dir / "tokenizer.model")

    def local(prompt: str, **sampling) -> str:
        return tok.decode(generate(model, tok.encode(prompt, bos=True), SamplingConfig(**sampling), eos_id=tok.eos_id))

    assert answers[0] == answers[1] == [local(p, max_new_tokens=6, seed=3) for p in ("def ", "import ")]
    assert answers[2] == [local(p, max_new_tokens=1, temperature=0.0) for p in ("def ", "import ")]
