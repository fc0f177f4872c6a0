"""The MLflow pyfunc model: `predict` generates text through lm_core's generation engine.

It is logged self-contained ("models from code"): MLflow stores lm_core and this file beside the weights
(`code_paths`) and, at load time, runs a three-line script that builds LmforgeTextGenerator from them.
Nothing is pickled, so loading needs neither lmforge's source tree nor its installed package, only the
pip requirements listed here (torch, numpy, safetensors, sentencepiece and MLflow's own). That is why this
file imports nothing from `pipelines`: in the model it is a top-level module named `pyfunc_model`.

The model starts its engine's own loop when it loads, so concurrent predict calls (`mlflow models serve`
answers requests on several threads) share one running batch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

PIP_REQUIREMENTS = ["torch==2.13.0", "numpy", "safetensors", "sentencepiece", "pandas"]
SLOTS = 8  # prompts decoded together across concurrent predict calls

# Sampling params a request may set (`mlflow models serve` passes only params declared in the signature,
# and fills in these defaults for the rest). MLflow params cannot be null, so "unset" has a value: top_k 0
# and top_p 1.0 mean no cut-off, seed -1 a fresh random seed, stop [] no stop strings.
PARAM_DEFAULTS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": -1,
                                  "stop": []}

# MLflow runs this when it loads the model, where `pyfunc_model` is this file stored with the model's code.
# It also runs it once while logging, inside lmforge, where this module has its package name.
_MODEL_SCRIPT = """\
from mlflow.models import set_model

try:
    from pyfunc_model import LmforgeTextGenerator
except ImportError:  # being logged by lmforge's register stage
    from pipelines.stages.pyfunc_model import LmforgeTextGenerator

set_model(LmforgeTextGenerator())
"""


def signature():
    """Input: a DataFrame with a string `prompt` column; output: one string per prompt; params PARAM_DEFAULTS."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    params = [ParamSpec(name, kind, PARAM_DEFAULTS[name]) for name, kind in
              (("max_new_tokens", "long"), ("temperature", "double"), ("top_k", "long"), ("top_p", "double"),
               ("seed", "long"))]
    params.append(ParamSpec("stop", "string", PARAM_DEFAULTS["stop"], shape=(-1,)))
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema(params))


def sampling_from_params(params: dict[str, Any] | None):
    from lm_core.sampling import SamplingConfig

    p = {**PARAM_DEFAULTS, **(params or {})}
    return SamplingConfig(
        max_new_tokens=int(p["max_new_tokens"]),
        temperature=float(p["temperature"]),
        top_k=int(p["top_k"]) if int(p["top_k"]) > 0 else None,
        top_p=float(p["top_p"]) if float(p["top_p"]) < 1.0 else None,
        seed=int(p["seed"]) if int(p["seed"]) >= 0 else None,
    )


def stops_from_params(params: dict[str, Any] | None) -> list[str]:
    stop = (params or {}).get("stop") or []
    stops = [stop] if isinstance(stop, str) else [str(s) for s in stop]
    if "" in stops:
        raise ValueError("params.stop holds an empty string, which would stop at once; pass non-empty texts")
    return stops


class LmforgeTextGenerator(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a `prompt` column (or a list of strings); output: one completion per prompt.

    Params: see PARAM_DEFAULTS."""

    def load_context(self, context):
        from lm_core.generation_engine import EngineConfig, GenerationEngine
        from lm_core.tokenizer import Tokenizer
        from lm_core.weights import TOKENIZER_FILE, load_model_dir

        model_dir = Path(context.artifacts["model_dir"])
        self.model, _ = load_model_dir(model_dir)
        self.tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)
        self.engine = GenerationEngine(self.model, EngineConfig(slots=SLOTS), tokenizer=self.tokenizer).start()

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate against them
        from lm_core.generate import complete_text

        prompts = model_input["prompt"].tolist() if hasattr(model_input, "columns") else list(model_input)
        ids = [self.tokenizer.encode(str(p), bos=True) for p in prompts]
        chunks = complete_text(self.model, self.tokenizer, ids, sampling_from_params(params),
                               stop=stops_from_params(params), engine=self.engine)
        return [chunk.text for chunk in chunks]


def log_model(model_dir: Path, registered_model_name: str | None = None):
    """Log `model_dir` (an export without its hf/ copy) as a self-contained pyfunc model under the active run."""
    import lm_core

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "lmforge_model.py"
        script.write_text(_MODEL_SCRIPT)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(script),
            artifacts={"model_dir": str(model_dir)},
            code_paths=[str(Path(lm_core.__file__).parent), __file__],
            pip_requirements=PIP_REQUIREMENTS,
            signature=signature(),
            registered_model_name=registered_model_name,
        )
