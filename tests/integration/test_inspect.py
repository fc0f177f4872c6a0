"""What a tiny trained model learned, as a user sees it: the embedding projector the pipeline writes,
`lmforge inspect neighbors` / `inspect attention` (PNG logged to MLflow), and `generate --dtype`.

Case/space variants on this model: the tiny config trains 30 steps on ~300k tokens of stdlib source,
so its embeddings mostly encode token frequency, and a word's variants ('self' / '▁self') are usually
not among its nearest tokens (measured: ranks ~30-50 of 511; 'None' / '▁None' ~390). This test checks
that the variants are found and ranked; tests/unit/test_introspect.py shows that training does pull
interchangeable variants together, on a stream where they really are interchangeable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from process_fixtures import lmforge

from lm_core.weights import load_model_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

@pytest.fixture(scope="module")
def trained(tiny_cli_run):
    root, ws, _ = tiny_cli_run
    return root, ws, Path((ws / "LATEST_EXPORT").read_text().strip())


def test_pipeline_writes_a_readable_embedding_projector(trained):
    from pipelines.stages.projector import read_projector

    _, ws, export = trained
    [config] = list((ws / "tensorboard").glob("*/projector/projector_config.pbtxt"))
    weights, labels = read_projector(config.parent)
    model, _ = load_model_dir(export)
    assert torch.allclose(weights, model.wte.weight.detach(), atol=1e-4)  # the trained model's, not a fresh one
    assert len(labels) == model.cfg.vocab_size and "\u2581self" in labels
    # TensorBoard's own reader finds it (the projector plugin reads this file per run directory)
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    parsed = text_format.Parse(config.read_text(), ProjectorConfig())
    assert [e.tensor_name for e in parsed.embeddings] == ["tok_emb:00000"]
    assert (config.parent / parsed.embeddings[0].metadata_path).is_file()


def test_neighbors_of_the_export_and_of_the_registered_model(trained):
    root, ws, _ = trained
    done = lmforge("inspect", "neighbors", "self", "--k", "5", "--workspace", ws, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("nearest tokens to 'self'") and len(lines) == 7
    assert "'\u2581self' #" in lines[-1]  # the space variant exists and is ranked
    registered = lmforge("inspect", "neighbors", "self", "--k", "5", "--workspace", ws,
                         "--model", "models:/lmforge-tiny@candidate", cwd=root)
    assert registered.returncode == 0, registered.stderr[-3000:]
    assert registered.stdout == done.stdout


def test_neighbors_of_a_word_that_is_several_tokens(trained):
    root, ws, _ = trained
    done = lmforge("inspect", "neighbors", "zyxwvutsrq", "--workspace", ws, cwd=root)
    assert done.returncode == 2
    assert "not one; pass a single piece" in done.stderr and "Traceback" not in done.stderr


def test_attention_png_is_logged_to_mlflow(trained):
    root, ws, _ = trained
    out = root / "attn.png"
    done = lmforge("inspect", "attention", "--prompt", "def main(self):", "--out", out, "--workspace", ws, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 layers x 4 heads" in done.stdout
    run_id = done.stdout.split(" run ")[1].split()[0]

    import mlflow

    from pipelines import mlflow_store
    from pipelines.workspace import Workspace

    mlflow_store.configure(Workspace(ws))
    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(run_id, "attention")] == ["attention/attn.png"]
    run = client.get_run(run_id)
    assert run.data.params["prompt"] == "def main(self):"
    export_meta = json.loads((Path((ws / "LATEST_EXPORT").read_text().strip()) / "config.json").read_text())
    assert run.data.tags["lmforge.pretrain_key"] == export_meta["lineage"]["lmforge.pretrain_key"]


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_generate_with_lighter_weights(trained, dtype):
    root, ws, _ = trained
    args = ("generate", "--workspace", ws, "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1")
    done = lmforge(*args, "--dtype", dtype, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("def ") and len(done.stdout.rstrip("\n")) > len("def ")
    bad = lmforge(*args, "--dtype", "int4", cwd=root)
    assert bad.returncode == 2 and "--dtype" in bad.stderr


def test_serve_int8_answers_like_generate_int8(trained):
    from fastapi.testclient import TestClient

    from lm_core.generate import SamplingConfig, complete_text
    from lm_core.quantize import prepare_for_inference
    from lm_core.tokenizer import Tokenizer
    from pipelines.apps.serving import create_app

    _, _, export = trained
    client = TestClient(create_app(export, model_name="tiny", dtype="int8"))
    assert client.get("/health").json()["dtype"] == "int8"
    got = client.post("/v1/completions", json={"model": "tiny", "prompt": "def ", "max_tokens": 12, "temperature": 0})
    assert got.status_code == 200, got.text
    tok = Tokenizer(export / "tokenizer.model")
    model = prepare_for_inference(load_model_dir(export)[0], "int8")
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    [expected] = complete_text(model, tok, [tok.encode("def ", bos=True)], greedy)
    assert got.json()["choices"][0]["text"] == expected.text
