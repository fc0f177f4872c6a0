"""The token-embedding matrix for TensorBoard's embedding projector, each row labelled with its
SentencePiece piece: the evaluate stage writes it beside the pretrain run's scalars."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm_core.introspect import embedding_matrix
from lm_core.model import GPT
from lm_core.tokenizer import Tokenizer

PROJECTOR_DIR = "projector"  # under the pretrain run's TensorBoard dir: shows up as run <pretrain_key>/projector
PROJECTOR_TAG = "tok_emb"


def piece_label(piece: str) -> str:
    """A piece as one TSV cell: tabs and newlines would split the projector's metadata rows."""
    return piece.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r") or "<empty>"


def write_projector(model: GPT, tok: Tokenizer, out_dir: Path) -> Path:
    """The (V, C) token embeddings with each token's piece as its label, as a TensorBoard projector run.
    Returns out_dir (it holds projector_config.pbtxt). Rewrites a previous projector there."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # one projector per trained model; a rerun must not add a second copy
    labels = [piece_label(tok.id_to_piece(i)) for i in range(tok.vocab_size)]
    weights = embedding_matrix(model)
    if weights.size(0) != len(labels):
        raise ValueError(f"the model has {weights.size(0)} token embeddings but the tokenizer {len(labels)} pieces; "
                         "pass the tokenizer the model was trained with")
    writer = SummaryWriter(str(out_dir))
    try:
        writer.add_embedding(weights, metadata=labels, tag=PROJECTOR_TAG, global_step=0)
    finally:
        writer.close()
    return out_dir


def read_projector(projector_dir: Path) -> tuple[torch.Tensor, list[str]]:
    """Read back what write_projector wrote, as TensorBoard's projector finds it: the config names the
    tensor and metadata files. (V, C) embeddings and V labels."""
    config = (Path(projector_dir) / "projector_config.pbtxt").read_text()
    paths = dict(line.strip().split(": ", 1) for line in config.splitlines() if line.strip().endswith('"'))
    tensors = Path(projector_dir) / json.loads(paths["tensor_path"])
    metadata = Path(projector_dir) / json.loads(paths["metadata_path"])
    rows = [list(map(float, line.split("\t"))) for line in tensors.read_text().splitlines()]
    return torch.tensor(rows), metadata.read_text(encoding="utf-8").split("\n")[:-1]
