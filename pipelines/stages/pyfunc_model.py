"""The MLflow pyfunc wrapper: `predict` generates text with lm_core's one generation loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

# Sampling params a request may set (`mlflow models serve` passes only params declared in the
# signature, and fills in these defaults for the rest). MLflow params cannot be null, so "unset"
# has a value: top_k 0 and top_p 1.0 mean no cut-off, seed -1 means a fresh random seed.
PARAM_DEFAULTS = {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": -1}


def signature():
    """Input: a DataFrame with a string `prompt` column; output: one string per prompt; PARAM_DEFAULTS."""
    import pandas as pd
    from mlflow.models import infer_signature

    return infer_signature(pd.DataFrame({"prompt": ["def "]}), ["completion"], params=PARAM_DEFAULTS)


def sampling_from_params(params: dict[str, Any] | None):
    from lm_core.generate import SamplingConfig

    p = {**PARAM_DEFAULTS, **(params or {})}
    return SamplingConfig(
        max_new_tokens=int(p["max_new_tokens"]),
        temperature=float(p["temperature"]),
        top_k=int(p["top_k"]) if int(p["top_k"]) > 0 else None,
        top_p=float(p["top_p"]) if float(p["top_p"]) < 1.0 else None,
        seed=int(p["seed"]) if int(p["seed"]) >= 0 else None,
    )


class LmforgeTextGenerator(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a `prompt` column (or a list of strings); output: one completion per prompt.

    Params: see PARAM_DEFAULTS.
    """

    def load_context(self, context):
        from lm_core.tokenizer import Tokenizer
        from lm_core.weights import TOKENIZER_FILE, load_model_dir

        model_dir = Path(context.artifacts["model_dir"])
        self.model, _ = load_model_dir(model_dir)
        self.tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate against them
        from lm_core.generate import generate

        prompts = model_input["prompt"].tolist() if hasattr(model_input, "columns") else list(model_input)
        sampling = sampling_from_params(params)
        return [
            self.tokenizer.decode(generate(self.model, self.tokenizer.encode(str(p), bos=True), sampling, eos_id=self.tokenizer.eos_id))
            for p in prompts
        ]
