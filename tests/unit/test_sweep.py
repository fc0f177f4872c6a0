"""pipelines.apps.sweep without running anything: the grid (its errors name the key and the fix), the
points it resolves to, the power-law fit on synthetic ladders, the frontier, and the plot."""

from __future__ import annotations

import numpy as np
import pytest

from lm_core.typed_config import ConfigError
from pipelines.apps import scaling_fit, sweep


def test_grid_parses_keys_and_values_in_order():
    grid = sweep.parse_grid(["model.n_embd=64, 128", "train.lr=1e-3,3e-3"])
    assert grid == {"model.n_embd": ["64", "128"], "train.lr": ["1e-3", "3e-3"]}


def test_grid_values_may_hold_commas_inside_brackets_and_quotes():
    grid = sweep.parse_grid(["ingest.sources=[{kind: stdlib, max_docs: 5}],[{kind: stdlib}]", "eval.prompts=['a,b'],['c']"])
    assert grid["ingest.sources"] == ["[{kind: stdlib, max_docs: 5}]", "[{kind: stdlib}]"]
    assert grid["eval.prompts"] == ["['a,b']", "['c']"]


@pytest.mark.parametrize("specs, names", [
    ([], ["--grid KEY=V1,V2", "model.n_embd=64,128"]),
    (["model.n_embd"], ["'model.n_embd'", "KEY=V1,V2"]),
    (["model.n_embd="], ["'model.n_embd='", "KEY=V1,V2"]),
    (["=64,128"], ["'=64,128'"]),
    (["model.n_embd=64,,128"], ["model.n_embd", "empty value"]),
    (["model.n_embd=64,64"], ["model.n_embd", "64", "once"]),
    (["model.n_embd=64", "model.n_embd=128"], ["model.n_embd", "given twice", "--grid model.n_embd=64,128"]),
    (["workspace=a,b"], ["workspace", "--workspace DIR"]),
])
def test_bad_grids_say_which_key_and_how_to_fix(specs, names):
    with pytest.raises(ConfigError) as info:
        sweep.parse_grid(specs)
    for name in names:
        assert name in str(info.value)


def test_plan_is_the_product_of_the_grid_over_one_workspace(tmp_path):
    ws = tmp_path / "ws"
    plan = sweep.plan("tiny", ["model.n_embd=32,64", "train.lr=1e-3,3e-3"], [f"workspace={ws}", "train.max_steps=7"])
    assert ws.is_dir()  # made before the CLI starts Prefect, whose home lives inside it
    assert [p.label for p in plan.points] == [
        "model.n_embd=32 train.lr=1e-3", "model.n_embd=32 train.lr=3e-3",
        "model.n_embd=64 train.lr=1e-3", "model.n_embd=64 train.lr=3e-3"]
    assert [(p.cfg.model.n_embd, p.cfg.train.lr) for p in plan.points] == [(32, 1e-3), (32, 3e-3), (64, 1e-3), (64, 3e-3)]
    assert {p.cfg.train.max_steps for p in plan.points} == {7}  # base overrides apply to every point
    assert {p.cfg.workspace for p in plan.points} == {str(ws)}
    assert plan.sweep_id == sweep.plan("tiny", ["model.n_embd=32,64", "train.lr=1e-3,3e-3"],
                                       [f"workspace={ws}", "train.max_steps=7"]).sweep_id


@pytest.mark.parametrize("grid, overrides, names", [
    (["model.n_embd=32,33"], [], ["sweep point 'model.n_embd=33'", "multiple of"]),
    (["model.n_emb=32,64"], [], ["sweep point 'model.n_emb=32'", "did you mean 'model.n_embd'"]),
    (["train.lr=1e-3,0.001"], [], ["'train.lr=1e-3' and 'train.lr=0.001'", "same config"]),
    (["train.max_steps=5,10"], ["train.max_steps=3"], ["train.max_steps", "both a --grid key and", "drop the override"]),
])
def test_plan_checks_every_point_before_any_work(tmp_path, grid, overrides, names):
    with pytest.raises(ConfigError) as info:
        sweep.plan("tiny", grid, [f"workspace={tmp_path}", *overrides])
    for name in names:
        assert name in str(info.value)
    assert not tmp_path.joinpath("artifacts").exists()


def test_power_law_recovers_a_and_b_from_exact_data():
    compute = np.geomspace(1e12, 1e17, 7)
    law = scaling_fit.fit_power_law(compute, 40.0 * compute ** -0.08)
    assert law.a == pytest.approx(40.0, rel=1e-6)
    assert law.b == pytest.approx(0.08, rel=1e-6)
    assert law.e == 0 and law.r2 == pytest.approx(1.0) and law.n == 7
    assert law.predict([1e20])[0] == pytest.approx(40.0 * 1e20 ** -0.08)


def test_power_law_with_noise_stays_close_and_r2_says_so():
    rng = np.random.default_rng(0)
    compute = np.geomspace(1e10, 1e16, 12)
    loss = 25.0 * compute ** -0.06 * np.exp(rng.normal(0, 0.01, compute.size))
    law = scaling_fit.fit_power_law(compute, loss)
    assert law.b == pytest.approx(0.06, abs=0.005)
    assert 0.9 < law.r2 < 1.0


def test_irreducible_term_is_recovered_where_a_plain_law_fits_worse():
    compute = np.geomspace(1e12, 1e18, 8)
    loss = 1.7 + 300.0 * compute ** -0.2
    law = scaling_fit.fit_power_law(compute, loss, irreducible=True)
    assert law.e == pytest.approx(1.7, rel=1e-4)
    assert law.a == pytest.approx(300.0, rel=1e-3)
    assert law.b == pytest.approx(0.2, rel=1e-4)
    assert law.r2 == pytest.approx(1.0)
    plain = scaling_fit.fit_power_law(compute, loss)
    assert plain.r2 < 0.99  # the floor bends the log-log line


@pytest.mark.parametrize("compute, loss, irreducible, words", [
    ([1e9], [3.0], False, "at least 2"),
    ([1e9, 2e9, 3e9], [3.0, 2.9, 2.8], True, "at least 4"),
    ([1e9, 1e9, 1e9], [3.0, 2.9, 2.8], False, "same compute"),
    ([1e9, -1e9], [3.0, 2.9], False, "> 0"),
    ([1e9, 2e9], [3.0, float("nan")], False, "finite"),
    ([1e9, 2e9], [3.0], False, "equal-length"),
])
def test_bad_fit_inputs_are_refused(compute, loss, irreducible, words):
    with pytest.raises(ValueError, match=words):
        scaling_fit.fit_power_law(compute, loss, irreducible)


def _row(label: str, compute: float, bpb: float) -> dict:
    return {"point": label, "model.n_embd": label, "compute_flops": compute, "val_bpb": bpb, "val_loss": bpb * 1.2,
            "params": 1000, "non_embedding_params": 800, "flops_per_token": 6000, "tokens": int(compute // 6000),
            "train_seconds": 1.0, "point_seconds": 2.0, "pretrain_key": "k" * 16, "upstream_reused": True,
            "model_version": "1", "model_run_id": "r"}


def test_fit_uses_the_best_point_at_each_compute():
    rows = [_row("a", 1e9, 3.0), _row("b", 1e9, 2.5), _row("c", 4e9, 2.2), _row("d", 1.6e10, 2.0)]
    assert scaling_fit.frontier(rows) == [1, 2, 3]
    law, note = scaling_fit.fit_rows(rows)
    assert law is not None and law.n == 3 and "3 compute values" in note
    assert [r["on_frontier"] for r in rows] == [False, True, True, True]
    law, note = scaling_fit.fit_rows(rows[:3])
    assert law is None and "2 distinct compute" in note and "--grid model.n_embd=" in note


def test_plot_and_table_are_written(tmp_path):
    rows = [_row("32", 1e9, 3.0), _row("64", 4e9, 2.6), _row("128", 1.6e10, 2.3)]
    law, _ = scaling_fit.fit_rows(rows)
    sweep.plot(rows, law, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep.write_csv(rows, tmp_path / "table.csv")
    lines = (tmp_path / "table.csv").read_text().splitlines()
    assert lines[0].startswith("point,model.n_embd,compute_flops,val_bpb") and len(lines) == 4
    md = sweep.markdown(sweep.SweepSummary(rows, law, ""))
    assert md.count("\n| ") == 3 and "L(C) =" in md  # a row per point after the header
