"""What a finished run prints (the headline numbers of each stage, per-source and extra-text scores) and how its
samples are seeded."""

from __future__ import annotations

from pipelines.apps.summary import print_summary
from pipelines.config import load_config
from pipelines.workspace import StageResult, Workspace


def test_the_summary_prints_per_source_scores_of_both_models_and_text_scores(tmp_path, capsys):
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}"])
    metrics = {"val_bpb": 1.9, "init_val_bpb": 2.1, "val_bpb.inbox": 2.4, "init_val_bpb.inbox": 2.7,
               "val_loss.inbox": 3.0, "text.austen.bpb": 2.2, "text.austen.loss": 3.1}
    results = {"evaluate": StageResult("evaluate", "k", str(tmp_path), metrics)}
    print_summary(cfg, Workspace(cfg.workspace), results, seconds=1.0)
    out = capsys.readouterr().out
    for key in ("val_bpb=1.9", "init_val_bpb=2.1", "val_bpb.inbox=2.4", "init_val_bpb.inbox=2.7", "text.austen.bpb=2.2"):
        assert key in out, key
    assert "val_loss.inbox" not in out and "text.austen.loss" not in out  # bpb only: one number per thing scored
    assert "--prompt 'def '" in out  # the configured prompt, not a stock one


def test_each_prompt_is_sampled_with_its_own_seed_from_the_configured_one():
    from lm_core.sampling import SamplingConfig
    from pipelines.stages.evaluate import prompt_sampling

    base = SamplingConfig(seed=7)
    a, b = prompt_sampling(base, "def "), prompt_sampling(base, "import ")
    assert a.seed != b.seed and a.seed != 7  # prompts do not share one noise stream
    assert prompt_sampling(base, "def ").seed == a.seed  # stable: a prompt's sample does not depend on the others
    assert prompt_sampling(SamplingConfig(seed=8), "def ").seed != a.seed
    assert (a.max_new_tokens, a.temperature) == (base.max_new_tokens, base.temperature)
    assert prompt_sampling(SamplingConfig(), "def ").seed is None  # unseeded stays unseeded
