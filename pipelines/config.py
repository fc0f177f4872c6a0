"""The pipeline config: one YAML file plus dotted overrides, composed from each stage's own config."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lm_core.engine import TrainConfig
from lm_core.generate import SamplingConfig
from lm_core.model import GPTConfig
from lm_core.tokenizer import TokenizerConfig
from lm_core.typed_config import ConfigError, build, to_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class SourceConfig:
    kind: Literal["shakespeare", "stdlib", "text_dir", "jsonl"] = "shakespeare"
    name: str = ""  # defaults to kind
    path: str | None = None  # text_dir: a directory or file; jsonl: a .jsonl file or a directory of them
    glob: str = "**/*.txt"  # text_dir: which files under path
    text_field: str = "text"  # jsonl: the field holding the document text
    doc_chars: int = 4000  # cut long files into documents of about this size at blank lines; 0: one per file
    max_docs: int | None = None  # stop after this many documents (smoke runs)

    def validate(self) -> None:
        if self.kind in ("text_dir", "jsonl") and not self.path:
            raise ConfigError(f"ingest.sources: a '{self.kind}' source needs 'path'; set path: /dir/with/files")
        if self.doc_chars < 0:
            raise ConfigError(f"ingest.sources[{self.label}].doc_chars={self.doc_chars} must be >= 0")

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass
class IngestConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    min_chars: int = 20  # shorter documents are quarantined as too_short
    max_chars: int = 2_000_000  # longer ones as too_long

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("ingest.sources is empty; name at least one source, e.g. [{kind: shakespeare}]")
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"ingest.sources names repeat ({labels}); give each source a distinct 'name'")


@dataclass
class DedupConfig:
    method: Literal["exact"] = "exact"


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
class EvalConfig:
    max_windows: int | None = 200  # validation windows of block_size tokens; null: the whole split
    batch_size: int = 8
    prompts: list[str] = field(default_factory=lambda: ["ROMEO.\n", "To be, or not to be", "The King"])
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=0.8, top_k=50, seed=0))


@dataclass
class RegisterConfig:
    experiment: str = "lmforge"
    model_name: str = "lmforge-gpt"
    alias: str = "candidate"


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

    def validate(self) -> None:
        if self.model.vocab_size != self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.model.vocab_size} differs from tokenizer.vocab_size={self.tokenizer.vocab_size}; "
                "set only tokenizer.vocab_size (the model takes it from there)"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def config_hash(self) -> str:
        """Hash of everything that shapes the model; the workspace location is not part of it."""
        data = {k: v for k, v in self.to_dict().items() if k != "workspace"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML (a path, or a name under configs/), apply `a.b=value` overrides, validate."""
    data = _read_yaml(resolve_config_path(path or "default"))
    for item in overrides or []:
        _apply_override(data, item)
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> PipelineConfig:
    data = json.loads(json.dumps(data))  # a private deep copy
    tokenizer_vocab = (data.get("tokenizer") or {}).get("vocab_size", TokenizerConfig.vocab_size)
    data.setdefault("model", {})
    if isinstance(data["model"], dict):
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
    value = yaml.safe_load(raw) if raw.strip() else ""
    *parents, leaf = dotted.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    node[leaf] = value
