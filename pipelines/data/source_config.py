"""What one ingest source is: its kind, where it is, how its text becomes documents.

Defined here, apart from pipelines.config, so that a worker process that reads a source's files imports only
the data library, not the model code (torch) that pipelines.config composes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lm_core.typed_config import ConfigError


@dataclass
class SourceConfig:
    kind: Literal["shakespeare", "stdlib", "text_dir", "jsonl", "parquet", "csv"] = "shakespeare"
    name: str = ""  # defaults to kind
    path: str | None = None  # text_dir: a directory or file; jsonl: a .jsonl(.gz/.zst) file or a directory of them;
    # parquet/csv: a file, a glob, or a URI DuckDB reads (s3://, https://, hf:// need DuckDB's httpfs, online)
    glob: str = "**/*.txt"  # text_dir: which files under path
    text_field: str = "text"  # jsonl/parquet/csv: the field (column) holding the document text
    doc_chars: int = 4000  # cut long files into documents of about this size at blank lines; 0: one per file
    max_docs: int | None = None  # stop after this many documents (smoke runs)

    def validate(self) -> None:
        if self.kind in ("text_dir", "jsonl", "parquet", "csv") and not self.path:
            raise ConfigError(f"ingest.sources: a '{self.kind}' source needs 'path'; set path: /dir/with/files")
        if self.doc_chars < 0:
            raise ConfigError(f"ingest.sources[{self.label}].doc_chars={self.doc_chars} must be >= 0")

    @property
    def label(self) -> str:
        return self.name or self.kind
