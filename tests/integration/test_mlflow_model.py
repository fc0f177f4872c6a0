"""The registered pyfunc model is self-contained: it loads and predicts in a Python environment where
lmforge is neither installed nor on the path, with the `stop` param in its signature.

The clean environment is a fresh virtualenv (no pip, no downloads) whose only link to this one is a .pth
line naming this venv's site-packages: third-party packages (torch, mlflow, ...) import from there, but
that directory's own .pth files are not processed, so lmforge's editable install is invisible. The
subprocess runs outside the repository, so `pipelines` and `lm_core` cannot come from the working tree
either; lm_core must come from the model's own code directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from serve_fixtures import build_export

from lm_core.generate import SamplingConfig, complete_text
from lm_core.tokenizer import Tokenizer
from lm_core.weights import TOKENIZER_FILE, load_model_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "lmforge-selfcontained"
PROMPTS = ["def main(", "import os\n"]

CLEAN_SCRIPT = """
import json, sys
found = {}
for name in ("pipelines", "lm_core", "flows"):
    try:
        __import__(name)
        found[name] = True
    except ImportError:
        found[name] = False
import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
params = json.loads(sys.argv[2])
out = model.predict(pd.DataFrame({"prompt": json.loads(sys.argv[3])}), params=params)
import lm_core
schema = model.metadata.get_params_schema()
print(json.dumps({"before_load": found, "lm_core": lm_core.__file__, "predictions": list(out),
                  "params": [p.name for p in schema.params]}))
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """An export logged and registered the way the register stage does it, in a temporary SQLite store."""
    import mlflow

    from pipelines import mlflow_store
    from pipelines.stages import pyfunc_model
    from pipelines.workspace import Workspace

    root = tmp_path_factory.mktemp("mlflow-model")
    export = build_export(root, block_size=128)
    ws = Workspace(root / "ws")
    mlflow_store.configure(ws)
    experiment = mlflow_store.experiment(mlflow_store.client(ws), ws, "selfcontained")
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        info = pyfunc_model.log_model(export, registered_model_name=NAME)
    return root, export, ws.mlflow_uri, f"models:/{NAME}/{info.registered_model_version}"


@pytest.fixture(scope="module")
def clean_python(registered) -> Path:
    root = registered[0]
    venv = root / "clean-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # third-party packages only
    return venv / "bin" / "python"


def test_loads_and_predicts_without_lmforge(registered, clean_python):
    root, export, uri, model_uri = registered
    params = {"max_new_tokens": 12, "temperature": 0.0, "stop": ["\n\n", "@@"]}
    outside = root / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(clean_python), "-c", CLEAN_SCRIPT, model_uri, json.dumps(params), json.dumps(PROMPTS)],
                          cwd=outside, env={**env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["before_load"] == {"pipelines": False, "lm_core": False, "flows": False}
    assert "/code/lm_core/" in answer["lm_core"]  # the copy stored with the model
    assert "stop" in answer["params"]
    model, _ = load_model_dir(export)
    tok = Tokenizer(export / TOKENIZER_FILE)
    expected = complete_text(model, tok, [tok.encode(p, bos=True) for p in PROMPTS],
                             SamplingConfig(max_new_tokens=12, temperature=0.0), stop=params["stop"])
    assert answer["predictions"] == [c.text for c in expected]
