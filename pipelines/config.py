"""The pipeline config: one YAML file plus dotted overrides, composed from each stage's own config."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lm_core.generate import SamplingConfig
from lm_core.model import GPTConfig, preset_fields
from lm_core.tokenizer import TokenizerConfig
from lm_core.train_config import TrainConfig
from lm_core.typed_config import ConfigError, build, to_dict
from pipelines.data.neardup import NearDupConfig
from pipelines.data.normalize import NormalizeConfig
from pipelines.data.source_config import SourceConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class IngestConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    min_chars: int = 20  # shorter documents are quarantined as too_short
    max_chars: int = 2_000_000  # longer ones as too_long
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    # files of a directory are read in groups of about this many bytes (a partition: one task, one catalog load);
    # 1: every file is its own partition
    partition_bytes: int = 16 << 20

    def validate(self) -> None:
        if self.partition_bytes < 1:
            raise ConfigError(f"ingest.partition_bytes={self.partition_bytes} must be >= 1 (e.g. 16777216 for 16 MiB)")
        if not self.sources:
            raise ConfigError("ingest.sources is empty; name at least one source, e.g. [{kind: shakespeare}]")
        if self.min_chars < 0:
            raise ConfigError(f"ingest.min_chars={self.min_chars} must be >= 0 (0 keeps every non-empty document)")
        if self.max_chars < max(1, self.min_chars):
            raise ConfigError(f"ingest.max_chars={self.max_chars} is below ingest.min_chars={self.min_chars}: every "
                              "document would be quarantined; set ingest.max_chars above ingest.min_chars")
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"ingest.sources names repeat ({labels}); give each source a distinct 'name'")


@dataclass
class QualityConfig:
    """Each rule drops a document with reason `quality:<rule>`; 0 (or null) switches a rule off.
    The defaults pass Shakespeare's verse and Python source; they catch markup debris and boilerplate."""
    min_words: int = 5
    max_words: int = 0
    min_alpha_fraction: float = 0.25  # letters / characters
    min_mean_word_length: float = 2.0
    max_mean_word_length: float = 25.0
    max_dup_line_fraction: float = 0.7  # repeated non-blank lines / non-blank lines
    max_symbol_word_ratio: float = 0.5  # (words starting with '#', '...', '…') / words


@dataclass
class EvalSetConfig:
    """Evaluation texts that training data must not contain (dedup drops `contaminates:<name>`)."""
    name: str = ""
    path: str = ""  # a text file, a directory of them (glob), or a .jsonl file / directory
    kind: Literal["text_dir", "jsonl"] = "text_dir"
    glob: str = "**/*.txt"
    text_field: str = "text"

    def validate(self) -> None:
        if not self.name or not self.path:
            raise ConfigError("dedup.decontaminate[]: each eval set needs a 'name' and a 'path', "
                              "e.g. {name: hamlet_eval, path: evals/hamlet.txt}")


@dataclass
class DedupConfig:
    method: Literal["exact", "near"] = "near"  # exact: quality + exact dedup only; near: then MinHash LSH
    quality: QualityConfig = field(default_factory=QualityConfig)
    near: NearDupConfig = field(default_factory=NearDupConfig)
    decontaminate: list[EvalSetConfig] = field(default_factory=list)
    decontam_ngram: int = 13  # a document sharing one word n-gram this long with an eval text is dropped
    incremental: bool = False  # judge only new documents, against what the last run with this config kept

    def validate(self) -> None:
        if self.decontam_ngram < 3:
            raise ConfigError(f"dedup.decontam_ngram={self.decontam_ngram} must be >= 3 (13 is the usual choice)")


@dataclass
class SplitConfig:
    val_fraction: float = 0.05
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"split.val_fraction={self.val_fraction} must be in (0, 0.5)")


@dataclass
class ShardConfig:
    tokens_per_shard: int = 2_000_000
    batch_docs: int = 256  # documents encoded per batch
    num_threads: int = 2

    def validate(self) -> None:
        if self.tokens_per_shard < 1024:
            raise ConfigError(f"shard.tokens_per_shard={self.tokens_per_shard} must be >= 1024")


@dataclass
class EvalTaskConfig:
    """A multiple-choice task: a file (JSONL or BIG-bench task.json) or a BIG-bench task by name."""
    name: str = ""  # metric prefix mc.<name>.*; defaults to the bigbench name or the file's stem
    path: str | None = None  # .jsonl lines {"context", "choices", "answer"}, or a BIG-bench task.json
    bigbench: str | None = None  # e.g. logical_deduction; extracted once from the bigbench sdist (see pipelines/bigbench.py)
    max_examples: int | None = None  # score only the first N examples

    def validate(self) -> None:
        if (self.path is None) == (self.bigbench is None):
            raise ConfigError(f"eval.tasks[{self.label}]: give exactly one of 'path' (a .jsonl or task.json file) "
                              "or 'bigbench' (a BIG-bench task name)")

    @property
    def label(self) -> str:
        return self.name or self.bigbench or (Path(self.path).stem if self.path else "?")


@dataclass
class EvalConfig:
    max_windows: int | None = 200  # validation windows of block_size tokens; null: the whole split
    batch_size: int = 8
    prompts: list[str] = field(default_factory=lambda: ["ROMEO.\n", "To be, or not to be", "The King"])
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=0.8, top_k=50, seed=0))
    texts: list[str] = field(default_factory=list)  # extra evaluation text files: text.<stem>.{loss,bpb}
    tasks: list[EvalTaskConfig] = field(default_factory=list)  # multiple-choice tasks: mc.<name>.{acc,acc_norm,...}
    decontam_ngram: int = 8  # word n-gram length of the task/training-data overlap check

    def validate(self) -> None:
        labels = [t.label for t in self.tasks]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"eval.tasks names repeat ({labels}); give each task a distinct 'name'")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"eval.max_windows={self.max_windows} must be >= 1, or null to score the whole "
                              "validation split")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size} must be >= 1")
        if self.decontam_ngram < 1:
            raise ConfigError(f"eval.decontam_ngram={self.decontam_ngram} must be >= 1; e.g. 8 or 13")


@dataclass
class RegisterConfig:
    experiment: str = "lmforge"
    model_name: str = "lmforge-gpt"
    alias: str = "candidate"  # every new version gets this alias
    champion_alias: str = "champion"  # moves to a new version only when it beats the current champion
    gate_metric: str = "val_bpb"  # an evaluate-stage metric (metrics.json) compared by the promotion gate
    gate_higher_is_better: bool = False  # val_bpb/val_loss: lower wins; accuracies (mc.*.acc): set true

    def validate(self) -> None:
        if self.alias == self.champion_alias:
            raise ConfigError(f"register.alias and register.champion_alias are both '{self.alias}'; "
                              "give them different names (default: candidate, champion)")


@dataclass
class FlowConfig:
    """How the Prefect flow runs its tasks. Not part of any key: the results do not depend on it."""
    # dask: ingest's partitions and dedup's MinHash partitions, band ranges and verification run as Dask tasks,
    # on the cluster at dask_address (or dask_scheduler_file), else on a LocalCluster of dask_workers started here
    task_runner: Literal["default", "dask"] = "default"
    dask_workers: int = 2
    dask_processes: bool = True  # False: Dask worker threads inside the flow's process (cheap; tests)
    dask_address: str | None = None  # an existing scheduler, e.g. tcp://10.0.0.5:8786 (infra/docker-compose.dask.yml)
    dask_scheduler_file: str | None = None  # or the JSON file `dask scheduler --scheduler-file` writes
    # default runner: worker processes for dedup's near-dup partitions and DuckDB threads of the data stages;
    # null: one process, DuckDB's own thread count (as before)
    data_workers: int | None = None

    def validate(self) -> None:
        if self.dask_workers < 1:
            raise ConfigError(f"flow.dask_workers={self.dask_workers} must be >= 1")
        if self.data_workers is not None and self.data_workers < 1:
            raise ConfigError(f"flow.data_workers={self.data_workers} must be >= 1, or null for one process")
        if self.dask_address and self.dask_scheduler_file:
            raise ConfigError("flow.dask_address and flow.dask_scheduler_file are both set; choose one")
        if (self.dask_address or self.dask_scheduler_file) and self.task_runner != "dask":
            raise ConfigError(f"flow.dask_address/dask_scheduler_file is set but flow.task_runner={self.task_runner}; "
                              "set flow.task_runner=dask to run on that cluster")
        if self.dask_address and "://" not in self.dask_address:
            raise ConfigError(f"flow.dask_address={self.dask_address} is not a scheduler address; "
                              "write it as tcp://HOST:8786")


@dataclass
class PipelineConfig:
    name: str = "default"
    workspace: str = "workspace"
    ingest: IngestConfig = field(default_factory=IngestConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: GPTConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    def validate(self) -> None:
        if self.model.vocab_size != self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.model.vocab_size} differs from tokenizer.vocab_size={self.tokenizer.vocab_size}; "
                "set only tokenizer.vocab_size (the model takes it from there)"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def config_hash(self) -> str:
        """Hash of everything that shapes the model; where it runs (workspace, task runner) is not part of it."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("workspace", "flow")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML (a path, or a name under configs/), apply `a.b=value` overrides, validate."""
    data = _read_yaml(resolve_config_path(path or "default"))
    for item in overrides or []:
        if item.partition("=")[0].strip() == "model.preset":  # a new shape: the file's model keys go, later ones apply
            data["model"] = {}
        _apply_override(data, item)
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> PipelineConfig:
    data = json.loads(json.dumps(data))  # a private deep copy
    tokenizer_vocab = (data.get("tokenizer") or {}).get("vocab_size", TokenizerConfig.vocab_size)
    data.setdefault("model", {})
    if isinstance(data["model"], dict):
        if "preset" in data["model"]:  # a named shape (lm_core.model.PRESETS); keys set next to it win
            data["model"] = {**preset_fields(data["model"].pop("preset")), **data["model"]}
        data["model"].setdefault("vocab_size", tokenizer_vocab)
    try:
        return build(PipelineConfig, data)
    except ConfigError:
        raise
    except ValueError as exc:  # a stage config's own validate(); its message already names the key
        raise ConfigError(str(exc)) from None


def resolve_config_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    named = CONFIG_DIR / f"{path}.yaml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{path}' not found; pass a YAML file path or one of: {known}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value, e.g. train.max_steps=200")
    dotted, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise ConfigError(f"override '{item}': the value is not valid YAML ({problem}); check its brackets and quotes, "
                          f"e.g. {dotted.strip()}='[{{kind: stdlib}}]'") from None
    *parents, leaf = dotted.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    node[leaf] = value
