"""A continued run: new files in an inbox become a new snapshot, and the champion trains on them.

`plan` turns a pipeline config into the config of a continued run, or says why there is nothing to do:
- the inbox is one more `text_dir` source (named `inbox`); ingest reads only the files no snapshot holds
  yet (its partitions are keyed by path, size and mtime) and copies the rest in SQL;
- dedup is incremental: new documents are judged against what the previous run kept;
- the tokenizer is the champion's own (`tokenizer.model_file`), so token ids keep their meaning, and the
  shards are re-encoded with it for the new snapshot (seconds at this scale; old documents included, so
  the continued run sees old and new data);
- pretraining starts from the champion's weights (`train.init_from`) and runs the token budget
  (`tokens` / (global batch x block size) optimizer steps, a fresh warmup and decay);
- evaluate also scores the champion on the new validation split (`init_val_*`), and the register stage's
  gate compares the two on that same data; the new version becomes champion only if it is better.

With no new file in the inbox, `plan` returns the reason and nothing runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipelines import mlflow_store
from pipelines.config import ConfigError, PipelineConfig, from_dict
from pipelines.mlflow_store import INIT_VERSION_TAG
from pipelines.stages import ingest
from pipelines.workspace import Workspace

INBOX_SOURCE = "inbox"


@dataclass
class ContinuePlan:
    cfg: PipelineConfig  # the continued run's pipeline config
    champion_version: str
    champion_dir: Path  # the champion's model directory (weights + tokenizer)
    new_files: list[str]
    steps: int
    tags: dict[str, str]  # lineage tags for the registered version


def plan(cfg: PipelineConfig, inbox: Path, tokens: int, glob: str = "**/*.txt") -> ContinuePlan | str:
    """The continued run for the files in `inbox`, or a sentence saying why there is nothing to do."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise ConfigError(f"the inbox {inbox} does not exist; create it and drop new {glob} files into it")
    if tokens < 1:
        raise ConfigError(f"--tokens={tokens} must be >= 1 (the training budget of the continued run)")
    if not any(p.is_file() for p in inbox.glob(glob)):
        return f"the inbox {inbox} holds no {glob} files: nothing to do"
    ws = Workspace(cfg.workspace)
    champion = champion_model_dir(ws, cfg.register.model_name, cfg.register.champion_alias)
    if champion is None:
        return (f"no {cfg.register.model_name}@{cfg.register.champion_alias} in the registry yet: "
                "run `lmforge run` first, then continue it")
    version, model_dir = champion

    from lm_core.tokenizer import Tokenizer

    vocab = Tokenizer(model_dir / "tokenizer.model").vocab_size
    steps = max(1, math.ceil(tokens / (cfg.train.global_batch_size * cfg.model.block_size)))
    data = cfg.to_dict()
    data["ingest"]["sources"] = [s for s in data["ingest"]["sources"] if s.get("name") != INBOX_SOURCE]
    data["ingest"]["sources"].append({"kind": "text_dir", "name": INBOX_SOURCE, "path": str(inbox.resolve()), "glob": glob})
    data["dedup"]["incremental"] = True
    data["tokenizer"].update(model_file=str(model_dir / "tokenizer.model"), vocab_size=vocab)
    data["model"]["vocab_size"] = vocab
    data["train"].update(init_from=str(model_dir), max_steps=steps,
                         warmup_steps=min(data["train"]["warmup_steps"], max(1, steps // 10)))
    continued = from_dict(data)
    new = [p for p in ingest.pending_partitions(continued, ws) if p.source.name == INBOX_SOURCE]
    if not new:
        return f"no new files in the inbox {inbox} (every {glob} file there was ingested before): nothing to do"
    return ContinuePlan(continued, version, model_dir, [f for p in new for f in p.files], steps, {INIT_VERSION_TAG: version})


def champion_model_dir(ws: Workspace, name: str, alias: str) -> tuple[str, Path] | None:
    """(version, local model directory) of `name@alias`, downloaded once per version into the workspace."""
    from mlflow.exceptions import MlflowException

    if not ws.mlflow_dir.is_dir():
        return None
    try:
        version = str(mlflow_store.client(ws).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None
    return version, mlflow_store.download_model(ws, f"models:/{name}/{version}", ws.root / "continue" / f"{name}-v{version}")
