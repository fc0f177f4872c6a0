"""The MLflow pyfunc wrapper: `predict` generates text with lm_core's one generation loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc


class LmforgeTextGenerator(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a `prompt` column (or a list of strings); output: one completion per prompt.

    Optional params: max_new_tokens, temperature, top_k, top_p, seed.
    """

    def load_context(self, context: Any) -> None:
        from lm_core.tokenizer import Tokenizer
        from lm_core.weights import TOKENIZER_FILE, load_model_dir

        model_dir = Path(context.artifacts["model_dir"])
        self.model, _ = load_model_dir(model_dir)
        self.tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from lm_core.generate import SamplingConfig, generate

        prompts = model_input["prompt"].tolist() if hasattr(model_input, "columns") else list(model_input)
        sampling = SamplingConfig(**{k: v for k, v in (params or {}).items() if k in SamplingConfig.__dataclass_fields__})
        return [
            self.tokenizer.decode(generate(self.model, self.tokenizer.encode(str(p), bos=True), sampling, eos_id=self.tokenizer.eos_id))
            for p in prompts
        ]
