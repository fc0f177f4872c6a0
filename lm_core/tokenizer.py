"""SentencePiece BPE tokenizer: training from a text iterator, and a thin typed wrapper.

Ids 0..3 are fixed: unk, bos, eos, pad. Normalization is the identity by default and extra whitespace
is kept, so decode(encode(text)) == text; newline is a user symbol because verse and code are
line-shaped and byte fallback would spend a token per line break otherwise. Another normalization
rule (e.g. nfkc) trades that exact round trip for a smaller alphabet: decode then gives the normalized
text, and bytes-per-token figures count the normalized bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    normalization: Literal["identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf"] = "identity"
    user_symbols: list[str] = field(default_factory=list)
    sample_bytes: int = 20_000_000  # bound on training text: large corpora are sampled, not loaded whole
    max_sentence_bytes: int = 8192  # longer lines are cut before training
    num_threads: int = 2
    seed: int = 0  # seeds the choice of training lines when the split is larger than sample_bytes
    # a trained SentencePiece model to use as it is instead of training one: continuing to train a model
    # needs the ids it was trained with (set vocab_size to that model's)
    model_file: str = ""

    def validate(self) -> None:
        if self.vocab_size < 260 and self.byte_fallback:
            raise ValueError(
                f"tokenizer.vocab_size={self.vocab_size} is too small with byte_fallback "
                "(256 byte pieces + 4 specials); set tokenizer.vocab_size >= 260"
            )
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(f"tokenizer.character_coverage={self.character_coverage} must be in [0.9, 1.0]")
        if self.num_threads < 1:
            raise ValueError(f"tokenizer.num_threads={self.num_threads} must be >= 1")


def train_tokenizer(cfg: TokenizerConfig, lines: Iterable[str], out_path: Path) -> Path:
    """Train on an iterator of text lines; write the model file atomically to out_path."""
    import sentencepiece as spm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # model_writer, not model_prefix: SentencePiece stores the prefix path inside the model file,
    # which would make the same training produce different bytes (and a different sha256) each time
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_bounded(lines, cfg.sample_bytes, cfg.max_sentence_bytes),
        model_writer=model,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback,
        user_defined_symbols=["\n", *cfg.user_symbols],
        normalization_rule_name=cfg.normalization,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        max_sentence_length=cfg.max_sentence_bytes,
        num_threads=cfg.num_threads,
        minloglevel=2,
    )
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)
    return out_path


def _bounded(lines: Iterable[str], max_bytes: int, max_line_bytes: int) -> Iterator[str]:
    total = 0
    for line in lines:
        if not line:
            continue
        encoded = line.encode("utf-8")[:max_line_bytes]
        total += len(encoded)
        if total > max_bytes:
            return
        yield encoded.decode("utf-8", errors="ignore")


class Tokenizer:
    """A trained SentencePiece model plus what the rest of lm_core needs to know about it."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}; run the tokenizer stage first")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.sha256: str = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of text; bos=True prefixes the document-start id, as every training document is."""
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        # sentencepiece releases the GIL and splits the batch over its own threads
        return self._sp.encode(texts, num_threads=num_threads)

    def encode_arrays(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Like encode_batch, but one int32 array per text: no Python int is made per token."""
        return self._sp.encode(texts, num_threads=num_threads, out_type="numpy")

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(map(int, ids)))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def byte_pieces(self) -> np.ndarray:
        """(vocab_size,) bool: which ids are byte-fallback pieces like <0xE6>."""
        return np.array([self._sp.is_byte(i) for i in range(self.vocab_size)], dtype=bool)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of each token's text, 0 for control tokens: (vocab_size,) int32.

        Used for bits per byte; '▁' in a piece is the one space byte it stands for, and with no dummy
        prefix the sum over a text's ids is exactly its UTF-8 length.
        """
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            if self._sp.is_byte(i):
                out[i] = 1
                continue
            out[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out
