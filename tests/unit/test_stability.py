"""Unit tests for lm_core.stability: the robust spike detector, fault parsing and the event log."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lm_core.stability import EventLog, FaultInjector, SpikeDetector, StabilityConfig, read_events


def feed(detector: SpikeDetector, losses, grad_norms=None):
    grad_norms = grad_norms if grad_norms is not None else [None] * len(losses)
    return [detector.check(loss, g) for loss, g in zip(losses, grad_norms)]


def noisy_decline(n: int, seed: int = 0) -> list[float]:
    """A loss curve like early training: falling fast, with batch noise."""
    rng = np.random.default_rng(seed)
    return [4.0 * math.exp(-i / 40) + 1.0 + rng.normal(0, 0.03) for i in range(n)]


def test_no_verdict_before_min_history():
    det = SpikeDetector(StabilityConfig(min_history=5, window=10))
    feed(det, [1.0, 1.0, 1.0, 1.0])
    assert det.threshold("loss") == math.inf
    assert det.check(50.0, None).action == "ok"  # 4 accepted values are too few to judge
    assert det.threshold("loss") < math.inf
    assert det.check(50.0, None).action == "skip"


def test_falling_noisy_loss_is_never_a_spike():
    det = SpikeDetector(StabilityConfig(min_history=10, window=50))
    verdicts = feed(det, noisy_decline(300))
    assert all(v.action == "ok" for v in verdicts)


def test_a_jump_is_a_spike_and_skipped_then_history_continues():
    det = SpikeDetector(StabilityConfig(min_history=10, window=50))
    feed(det, noisy_decline(60))
    level = float(np.median(list(det.history["loss"])[-5:]))
    verdict = det.check(level * 2, None)
    assert verdict.action == "skip" and verdict.reason == "spike" and verdict.metric == "loss"
    assert verdict.value == pytest.approx(level * 2)
    assert level < verdict.threshold < level * 2
    assert len(det.history["loss"]) == 50  # the spike did not join the history
    assert det.check(level, None).action == "ok"
    assert det.consecutive == 0


def test_small_rise_within_the_relative_floor_is_fine():
    det = SpikeDetector(StabilityConfig(min_history=10, window=20, loss_min_jump=0.3))
    feed(det, [2.0] * 20)  # MAD of differences is 0: only the relative floor decides
    assert det.check(2.5, None).action == "ok"
    assert det.check(2.7, None).action == "skip"


def test_grad_norm_spike_is_detected_on_its_own():
    det = SpikeDetector(StabilityConfig(min_history=10, window=20))
    rng = np.random.default_rng(1)
    feed(det, [2.0] * 20, list(1.0 + rng.normal(0, 0.05, 20)))
    assert det.check(2.0, 1.8).action == "ok"  # grad norms drift: less than double is no spike
    verdict = det.check(2.0, 5.0)
    assert (verdict.action, verdict.metric) == ("skip", "grad_norm")


def test_persistent_spike_rolls_back_after_patience():
    det = SpikeDetector(StabilityConfig(min_history=10, window=20, patience=3))
    feed(det, [2.0] * 20)
    assert [det.check(9.0, None).action for _ in range(3)] == ["skip", "skip", "rollback"]
    assert det.check(9.0, None).reason == "spike"  # the count restarts after a rollback verdict


@pytest.mark.parametrize("loss, grad", [(float("nan"), 1.0), (float("inf"), 1.0), (1.0, float("nan"))])
def test_nonfinite_rolls_back_at_once(loss, grad):
    det = SpikeDetector(StabilityConfig())
    verdict = det.check(loss, grad)
    assert verdict.action == "rollback" and verdict.reason == "nonfinite"
    assert not det.history["loss"]


def test_state_round_trip():
    cfg = StabilityConfig(min_history=3, window=8)
    a = SpikeDetector(cfg)
    feed(a, [3.0, 2.9, 2.8, 2.7], [1.0, 1.1, 0.9, 1.0])
    b = SpikeDetector(cfg)
    b.load_state_dict(a.state_dict())
    assert b.threshold("loss") == a.threshold("loss") and b.threshold("grad_norm") == a.threshold("grad_norm")


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
