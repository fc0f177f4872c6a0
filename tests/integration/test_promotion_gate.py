"""The promotion gate on a real MLflow registry (SQLite in a temp dir), with versions whose eval
numbers are set by hand: first version champion, better promoted, worse and equal refused."""

from __future__ import annotations

import pytest

from lm_core.typed_config import ConfigError
from pipelines.config import load_config
from pipelines.stages.register import EVAL_WINDOWS_TAG, _gate_value_of, promotion_gate
from pipelines.workspace import StageResult

pytestmark = pytest.mark.integration
NAME = "gate-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's migrations, ~5 s)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("gate")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return client, client.create_experiment("gate", artifact_location=(root / "artifacts").as_uri())


@pytest.fixture
def registry(store, request):
    """A registered model of this test's own, and a helper that adds a version whose run logged `metrics`."""
    client, experiment = store
    name = f"{NAME}-{request.node.name[5:30]}".replace("_", "-")
    client.create_registered_model(name)

    def add_version(metrics: dict[str, float], eval_data: str = "windows-1") -> str:
        run = client.create_run(experiment)
        for metric, value in metrics.items():
            client.log_metric(run.info.run_id, f"eval.{metric}", value)
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version(name, source=run.info.artifact_uri, run_id=run.info.run_id,
                                         tags={EVAL_WINDOWS_TAG: eval_data})
        return str(mv.version)

    return Registry(client, name, add_version)


class Registry:
    def __init__(self, client, name, add):
        self.client, self.name, self.add = client, name, add

    def gate(self, version: str, value: float, *overrides: str, eval_data: str = "windows-1", rescore=None) -> dict:
        cfg = load_config("tiny", [f"register.model_name={self.name}", *overrides])
        return promotion_gate(self.client, cfg, version, value, eval_data, rescore=rescore)

    def champion(self) -> str | None:
        value = self.client.get_registered_model(self.name).aliases.get("champion")
        return None if value is None else str(value)


def test_gate_promotes_better_and_refuses_worse_or_equal(registry):
    r = registry
    v1 = r.add({"val_bpb": 2.0})
    first = r.gate(v1, 2.0)
    assert first["promoted"] and first["champion_version"] is None and r.champion() == v1

    v2 = r.add({"val_bpb": 2.5})
    worse = r.gate(v2, 2.5)
    assert not worse["promoted"] and worse["decision"] == "refused" and r.champion() == v1
    assert (worse["value"], worse["champion_version"], worse["champion_value"]) == (2.5, v1, 2.0)
    assert worse["reason"] == "val_bpb 2.5 >= champion v1's 2 (lower is better)"

    v3 = r.add({"val_bpb": 1.5})
    better = r.gate(v3, 1.5)
    assert better["promoted"] and r.champion() == v3 and better["champion_after"] == v3
    assert better["champion_value"] == 2.0 and better["same_eval_data"] is True

    v4 = r.add({"val_bpb": 1.5})
    tie = r.gate(v4, 1.5)
    assert not tie["promoted"] and r.champion() == v3  # a tie keeps the champion

    tags = r.client.get_model_version(r.name, v2).tags
    assert tags["lmforge.gate.decision"] == "refused"
    assert (float(tags["lmforge.gate.value"]), tags["lmforge.gate.champion_version"]) == (2.5, v1)
    assert float(tags["lmforge.gate.champion_value"]) == 2.0


def test_numbers_from_other_windows_are_never_compared(registry):
    """A lower val_bpb measured on other validation windows says nothing: the champion is re-scored on the
    candidate's windows, and when it cannot be, the candidate is not promoted."""
    r = registry
    v1 = r.add({"val_bpb": 2.0})
    r.gate(v1, 2.0)
    v2 = r.add({"val_bpb": 1.0}, eval_data="windows-2")
    refused = r.gate(v2, 1.0, eval_data="windows-2")  # much lower, but on other data, and no way to re-score
    assert not refused["promoted"] and r.champion() == v1 and refused["same_eval_data"] is False
    assert "scored on other validation windows" in refused["reason"]
    asked = []

    def rescore(version: str) -> float:
        asked.append(version)
        return 0.9  # the champion on windows-2: better than the candidate there

    kept = r.gate(v2, 1.0, eval_data="windows-2", rescore=rescore)
    assert asked == [v1] and not kept["promoted"] and kept["champion_value"] == 0.9 and kept["champion_rescored"] is True
    assert kept["same_eval_data"] is True and "re-scored" in kept["reason"]
    better = r.gate(v2, 1.0, eval_data="windows-2", rescore=lambda version: 1.2)
    assert better["promoted"] and r.champion() == v2


def test_higher_is_better_metric_read_from_the_champions_run(registry):
    r = registry
    v1 = r.add({"val_bpb": 2.0, "mc.toy.acc": 0.4})
    r.gate(v1, 2.0)  # champion, gated on val_bpb: its mc.toy.acc comes from its run
    v2 = r.add({"mc.toy.acc": 0.6})
    better = r.gate(v2, 0.6, "register.gate_metric=mc.toy.acc", "register.gate_higher_is_better=true")
    assert better["promoted"] and better["champion_value"] == 0.4 and r.champion() == v2
    assert better["reason"] == "mc.toy.acc 0.6 > champion v1's 0.4 (higher is better)"


def test_champion_without_the_metric_is_kept(registry):
    r = registry
    v1 = r.add({})
    r.client.set_registered_model_alias(r.name, "champion", v1)  # e.g. promoted by hand, never evaluated
    v2 = r.add({"val_bpb": 1.0})
    out = r.gate(v2, 1.0)
    assert not out["promoted"] and r.champion() == v1
    assert f"`lmforge models promote {r.name} {v2}`" in out["reason"]


def test_gate_metric_must_be_an_evaluate_metric():
    cfg = load_config("tiny", ["register.gate_metric=val_bpp"])
    evaluate = StageResult("evaluate", "k", "/nowhere", {"val_bpb": 1.2, "val_loss": 3.0})
    with pytest.raises(ConfigError, match=r"register.gate_metric='val_bpp' .* one of: val_bpb, val_loss"):
        _gate_value_of(cfg, evaluate)
    with pytest.raises(ConfigError, match="register.alias and register.champion_alias are both 'champion'"):
        load_config("tiny", ["register.alias=champion"])
