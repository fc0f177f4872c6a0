"""The prepared CUDA check (`python -m bench gpu`) runs its code paths on CPU with --smoke, so the script a
GPU session gets minutes for does not fail on something a CPU could have caught."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_cpu_path(tmp_path):
    from bench.gpu import run

    result = run(["--smoke", "--out", str(tmp_path)])
    assert result["smoke"] is True and result["environment"]["device"] == "cpu"
    assert result["sdpa"]["MATH"]["ok"] and result["sdpa"]["MATH"]["max_abs_diff_vs_math"] == 0.0
    assert set(result["train"]) == {"plain_compiled_bf16", "engine_bf16_zero1", "engine_bf16_zero0", "engine_bf16_zero2",
                                    "engine_bf16_zero3", "engine_fp32_zero0_tf32"}
    for name, row in result["train"].items():
        assert "error" not in row, (name, row)
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row.get("rollbacks", 0) == 0
    plain, engine = result["train"]["plain_compiled_bf16"], result["train"]["engine_bf16_zero1"]
    assert result["ratio"] == round(engine["tokens_per_s"] / plain["tokens_per_s"], 4)
    assert result["mfu"] == engine["mfu"] and result["ratios"]["engine_bf16_zero1"] == result["ratio"]
    assert all(check["ok"] for check in result["sync_check"].values()), result["sync_check"]
    assert "error" not in result["profile"] and "Self CPU" in result["profile"]["table"]
    assert json.loads((tmp_path / "gpu.json").read_text())["model"]["preset"] == "tiny"
