"""Optional GGUF export (llama.cpp's file format) of an export's Hugging Face Llama directory.

    python -m pipelines.apps.gguf_export EXPORT_DIR [OUT.gguf]     (EXPORT_DIR/hf must exist)

Tensors are renamed with the gguf package's own Llama name map and stored as float32; q/k rows are
permuted back to the interleaved RoPE layout llama.cpp uses (as its convert_hf_to_gguf.py does for
Llama). The vocabulary is the SentencePiece model's pieces, scores and piece types, with no space
prefix (our tokenizer has add_dummy_prefix=False).
NOTE: checked here by reading the file back (names, shapes, values, metadata); not run under
llama.cpp, which is not available on these machines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def permute_for_gguf(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (the same as convert_hf_to_gguf)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def unpermute_from_gguf(weights: np.ndarray, n_head: int) -> np.ndarray:
    return weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(hf_dir: Path, out_path: Path) -> Path:
    import gguf
    from safetensors.numpy import load_file
    from sentencepiece import sentencepiece_model_pb2

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((hf_dir / "tokenizer.model").read_bytes())

    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(out_path.stem)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])  # SentencePiece's numbering is GGUF's
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for name, tensor in load_file(str(hf_dir / "model.safetensors")).items():
        if name.endswith("q_proj.weight"):
            tensor = permute_for_gguf(tensor, n_head)
        elif name.endswith("k_proj.weight"):
            tensor = permute_for_gguf(tensor, n_kv)
        new_name = names.get_name(name, try_suffixes=(".weight",))
        if new_name is None:
            raise ValueError(f"no GGUF name for {name}")
        writer.add_tensor(new_name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """name -> array in numpy (row-major) shape, read back with the gguf package's reader."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data).reshape(tuple(reversed([int(n) for n in t.shape]))) for t in reader.tensors}


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    export = Path(argv[0])
    out = Path(argv[1]) if len(argv) == 2 else export / "model.gguf"
    if not (export / "hf" / "config.json").is_file():
        print(f"gguf: error: {export}/hf is missing (the architecture did not map onto Llama)", file=sys.stderr)
        return 2
    print(write_gguf(export / "hf", out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
