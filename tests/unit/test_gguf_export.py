"""GGUF export: read back with the gguf package — tensor names, shapes, values and the vocabulary."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch

from lm_core.hf_export import save_hf_dir
from lm_core.model import GPT, GPTConfig
from lm_core.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from pipelines.apps.gguf_export import permute_for_gguf, read_tensors, unpermute_from_gguf, write_gguf


def test_round_trip_of_names_shapes_and_values(tmp_path):
    import gguf

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [line for f in sorted(stdlib.glob("*.py"))[:10] for line in f.read_text(errors="ignore").splitlines(keepends=True)]
    tok_path = train_tokenizer(TokenizerConfig(vocab_size=512, num_threads=1), lines, tmp_path / "tokenizer.model")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = GPT(cfg)
    hf = save_hf_dir(model, tok_path, tmp_path / "hf")
    tensors = read_tensors(write_gguf(hf, tmp_path / "model.gguf"))

    C, D, hidden = cfg.n_embd, cfg.head_dim, cfg.hidden_dim
    expected = {"token_embd.weight": (512, C), "output_norm.weight": (C,)}
    for i in range(cfg.n_layer):
        expected.update({f"blk.{i}.attn_q.weight": (4 * D, C), f"blk.{i}.attn_k.weight": (2 * D, C),
                         f"blk.{i}.attn_v.weight": (2 * D, C), f"blk.{i}.attn_output.weight": (C, 4 * D),
                         f"blk.{i}.ffn_gate.weight": (hidden, C), f"blk.{i}.ffn_up.weight": (hidden, C),
                         f"blk.{i}.ffn_down.weight": (C, hidden), f"blk.{i}.attn_norm.weight": (C,),
                         f"blk.{i}.ffn_norm.weight": (C,)})
    assert {k: v.shape for k, v in tensors.items()} == expected  # tied: no output.weight, llama.cpp reuses token_embd
    block = model.blocks[1]
    np.testing.assert_array_equal(tensors["token_embd.weight"], model.wte.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], block.mlp.down_proj.weight.detach().numpy())
    np.testing.assert_array_equal(unpermute_from_gguf(tensors["blk.1.attn_q.weight"], 4), block.attn.q_proj.weight.detach().numpy())
    np.testing.assert_array_equal(unpermute_from_gguf(tensors["blk.1.attn_k.weight"], 2), block.attn.k_proj.weight.detach().numpy())
    assert not np.array_equal(tensors["blk.1.attn_q.weight"], block.attn.q_proj.weight.detach().numpy())  # it was permuted

    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    field = lambda key: reader.fields[key]  # noqa: E731
    assert bytes(field("general.architecture").parts[-1]).decode() == "llama"
    assert int(field("llama.block_count").parts[-1][0]) == 2 and int(field("llama.attention.head_count_kv").parts[-1][0]) == 2
    tokens = field("tokenizer.ggml.tokens")
    sp = Tokenizer(tok_path)
    assert len(tokens.data) == 512
    assert [bytes(tokens.parts[i]).decode() for i in tokens.data[:6]] == [sp.id_to_piece(i) for i in range(6)]


def test_permutation_is_llama_cpp_interleaving():
    # one head, D = 4: HF rows (x0, x1 | x2, x3) rotate as pairs (0, 2), (1, 3); llama.cpp wants them adjacent
    w = np.arange(4, dtype=np.float32)[:, None]
    assert permute_for_gguf(w, 1)[:, 0].tolist() == [0, 2, 1, 3]
    assert unpermute_from_gguf(permute_for_gguf(w, 1), 1)[:, 0].tolist() == [0, 1, 2, 3]
