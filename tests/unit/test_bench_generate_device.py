"""The prepared GPU decode comparison (`python -m bench generate --device cuda`) runs its code path on CPU with
--smoke: the static engine at batch 1 and batch 4 against transformers' generate on the same export."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_generate_device_smoke(tmp_path):
    pytest.importorskip("transformers")
    from bench.generate import run

    result = run(["--device", "cpu", "--smoke", "--repeats", "1", "--out", str(tmp_path)])
    assert result["smoke"] is True and set(result["rows"]) == {"lmforge_b1_static", "lmforge_b4_static", "transformers_b1"}
    assert all(row["tokens_per_s"] > 0 for row in result["rows"].values())
    assert result["matching_prefix_vs_transformers"] == result["new_tokens"]  # same weights, greedy: same tokens
    assert result["compile_fallback"] is None
    assert json.loads((tmp_path / "generate_device.json").read_text())["ratios"] == result["ratios"]
