"""Unit tests for lm_core.stability: the spike gate (on the device), fault parsing and the event log."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lm_core.stability import EventLog, FaultInjector, SpikeGate, StabilityConfig, read_events


def feed(gate: SpikeGate, losses, grad_norms=None):
    grad_norms = grad_norms if grad_norms is not None else [None] * len(losses)
    return [gate.check(loss, g) for loss, g in zip(losses, grad_norms)]


def history(gate: SpikeGate, metric: str = "loss") -> list[float]:
    return gate.state_dict()["history"][metric]


def noisy_decline(n: int, seed: int = 0) -> list[float]:
    """A loss curve like early training: falling fast, with batch noise."""
    rng = np.random.default_rng(seed)
    return [4.0 * math.exp(-i / 40) + 1.0 + rng.normal(0, 0.03) for i in range(n)]


def test_no_verdict_before_min_history():
    gate = SpikeGate(StabilityConfig(min_history=5, window=10))
    feed(gate, [1.0, 1.0, 1.0, 1.0])
    assert float(gate.thresholds()[0]) == math.inf
    assert gate.check(50.0, None).reason == "ok"  # 4 accepted values are too few to judge
    assert float(gate.thresholds()[0]) < math.inf
    assert gate.check(50.0, None).reason == "spike"


def test_falling_noisy_loss_is_never_a_spike():
    gate = SpikeGate(StabilityConfig(min_history=10, window=50))
    verdicts = feed(gate, noisy_decline(300))
    assert all(v.reason == "ok" for v in verdicts)


def test_a_jump_is_a_spike_and_vetoed_then_history_continues():
    gate = SpikeGate(StabilityConfig(min_history=10, window=50))
    feed(gate, noisy_decline(60))
    level = float(np.median(history(gate)[-5:]))
    verdict = gate.check(level * 2, None)
    assert verdict.reason == "spike" and verdict.vetoed and verdict.metric == "loss"
    assert verdict.value == pytest.approx(level * 2)
    assert level < verdict.threshold < level * 2
    assert len(history(gate)) == 50 and history(gate)[-1] != pytest.approx(level * 2)  # the spike did not join
    assert gate.check(level, None).reason == "ok"
    assert int(gate.consecutive) == 0


def test_threshold_matches_the_documented_formula():
    """level + max(z * 1.4826 * MAD(diffs) / sqrt(2), min_jump * |level|), computed here with numpy."""
    cfg = StabilityConfig(min_history=10, window=30, zscore=6.0, loss_min_jump=0.01)
    gate = SpikeGate(cfg)
    values = noisy_decline(45, seed=4)
    feed(gate, values)
    kept = np.array(values[-30:])
    diffs = np.diff(kept)
    sigma = 1.4826 * np.median(np.abs(diffs - np.median(diffs))) / math.sqrt(2)
    level = np.median(kept[-5:])
    assert float(gate.thresholds()[0]) == pytest.approx(level + max(6.0 * sigma, 0.01 * abs(level)), rel=1e-5)


def test_small_rise_within_the_relative_floor_is_fine():
    gate = SpikeGate(StabilityConfig(min_history=10, window=20, loss_min_jump=0.3))
    feed(gate, [2.0] * 20)  # MAD of differences is 0: only the relative floor decides
    assert gate.check(2.5, None).reason == "ok"
    assert gate.check(2.7, None).reason == "spike"


def test_grad_norm_spike_is_detected_on_its_own():
    gate = SpikeGate(StabilityConfig(min_history=10, window=20))
    rng = np.random.default_rng(1)
    feed(gate, [2.0] * 20, list(1.0 + rng.normal(0, 0.05, 20)))
    assert gate.check(2.0, 1.8).reason == "ok"  # grad norms drift: less than double is no spike
    verdict = gate.check(2.0, 5.0)
    assert (verdict.reason, verdict.metric) == ("spike", "grad_norm")


def test_persistent_spike_after_patience():
    gate = SpikeGate(StabilityConfig(min_history=10, window=20, patience=3))
    feed(gate, [2.0] * 20)
    assert [gate.check(9.0, None).reason for _ in range(3)] == ["spike", "spike", "persistent_spike"]
    assert gate.check(9.0, None).reason == "spike"  # the count restarts after a persistent verdict


@pytest.mark.parametrize("loss, grad", [(float("nan"), 1.0), (float("inf"), 1.0), (1.0, float("nan"))])
def test_nonfinite_is_vetoed_at_once_and_counts_toward_patience(loss, grad):
    gate = SpikeGate(StabilityConfig(patience=2))
    verdict = gate.check(loss, grad)
    assert verdict.reason == "nonfinite" and verdict.vetoed
    assert history(gate) == []
    assert gate.check(loss, grad).reason == "persistent_spike"


def test_disabled_gate_vetoes_only_nonfinite_steps():
    gate = SpikeGate(StabilityConfig(enabled=False, min_history=2, window=4, patience=1))
    feed(gate, [2.0] * 4)
    assert gate.check(50.0, 1.0).reason == "ok"
    assert gate.check(float("nan"), 1.0).reason == "nonfinite"


def test_judge_writes_its_verdict_log_and_returns_the_veto():
    gate = SpikeGate(StabilityConfig(min_history=2, window=4), log_size=3)
    loss = torch.tensor(2.0)
    for slot in range(3):
        gate.begin(slot, loss)
    assert [v.reason for v in gate.read([0, 1, 2])] == ["unjudged"] * 3
    assert float(gate.judge(0, loss, torch.tensor(1.0))) == 0.0
    assert float(gate.judge(1, loss, torch.tensor(1.0))) == 0.0
    assert float(gate.judge(2, torch.tensor(20.0), torch.tensor(1.0))) == 1.0
    reasons = gate.read([0, 1, 2])
    assert [v.reason for v in reasons] == ["ok", "ok", "spike"] and reasons[2].loss == 20.0 and reasons[0].grad_norm == 1.0


def test_state_round_trip():
    cfg = StabilityConfig(min_history=3, window=8)
    a = SpikeGate(cfg)
    feed(a, [3.0, 2.9, 2.8, 2.7], [1.0, 1.1, 0.9, 1.0])
    b = SpikeGate(cfg)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.thresholds(), b.thresholds())
    assert b.state_dict() == a.state_dict()
    c = SpikeGate(cfg)  # the host-side detector's state of earlier checkpoints: the same fields
    c.load_state_dict({"history": {"loss": [3.0, 2.9, 2.8, 2.7], "grad_norm": [1.0, 1.1, 0.9, 1.0]}, "consecutive": 0})
    assert torch.equal(a.thresholds(), c.thresholds())


def test_fault_parsing_and_validation():
    cfg = StabilityConfig(inject_fault="nan@5, corrupt_batch@7,lr_spike@7")
    assert cfg.faults() == {5: ["nan"], 7: ["corrupt_batch", "lr_spike"]}
    injector = FaultInjector(cfg)
    assert injector.take(7) == ["corrupt_batch", "lr_spike"] and injector.take(7) == []  # fires once
    with pytest.raises(ValueError, match="train.stability.inject_fault has 'boom@3'"):
        StabilityConfig(inject_fault="boom@3").validate()
    with pytest.raises(ValueError, match="train.stability.min_history=9 must be <= train.stability.window=4"):
        StabilityConfig(min_history=9, window=4).validate()
    StabilityConfig().validate()


def test_corrupt_batch_is_random_tokens_of_the_same_shape():
    window = np.arange(40, dtype=np.int64).reshape(4, 10)
    bad = FaultInjector.corrupt(window, vocab_size=16, seed=0)
    assert bad.shape == window.shape and bad.dtype == np.int64 and bad.max() < 16
    assert not np.array_equal(bad, window)


def test_event_log_appends_json_lines(tmp_path):
    log = EventLog(tmp_path / "e" / "events.jsonl")
    log.write(3, "spike", "skip_update", metric="loss", value=7.5, threshold=4.0, window=2)
    log.write(4, "nonfinite", "rollback", metric="loss", value=float("nan"), threshold=math.inf)
    again = EventLog(tmp_path / "e" / "events.jsonl")  # a resumed run appends
    again.write(9, "rollback", "resume", detail="to step00000005")
    rows = read_events(tmp_path / "e" / "events.jsonl")
    assert [(r["step"], r["kind"], r["action"]) for r in rows] == [
        (3, "spike", "skip_update"), (4, "nonfinite", "rollback"), (9, "rollback", "resume")]
    assert rows[0]["value"] == 7.5 and rows[1]["value"] == "nan" and rows[1]["threshold"] == "inf"
    assert read_events(tmp_path / "missing.jsonl") == []


def test_warmup_judges_nan_only_and_fills_the_history():
    gate = SpikeGate(StabilityConfig(min_history=5, window=10))
    feed(gate, [2.0] * 6)
    assert gate.check(20.0, 1.0, spikes=False).reason == "ok"  # a jump during warmup is not judged...
    assert history(gate)[-1] == 20.0  # ...and joins the history like any accepted step
    assert gate.check(float("nan"), 1.0, spikes=False).reason == "nonfinite"  # NaN is vetoed all the same


def test_a_healthy_grad_norm_swing_is_no_spike_but_a_blow_up_is():
    gate = SpikeGate(StabilityConfig(min_history=10, window=20))
    rng = np.random.default_rng(2)
    feed(gate, [2.0] * 20, list(0.47 + rng.normal(0, 0.03, 20)))
    assert gate.check(2.0, 1.09).reason == "ok"  # 2.3x the recent level: seen in healthy runs
    assert gate.check(2.0, 47.0).reason == "spike"
