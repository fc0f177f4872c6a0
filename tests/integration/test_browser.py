"""After a real `lmforge run` (tiny config, a Prefect flow run), `lmforge ui` shows it: the flow run and
the MLflow run link to each other (artifacts one way, tags the other), and headless Chromium, following
those very links, renders the flow run in the Prefect UI and the run and its registered model in the
MLflow UI. Chromium renders each page with `--dump-dom` (no driver package, nothing downloaded);
without a Chromium binary the browser tests skip and say how to install one (`make browser-deps`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request

import pytest
from process_fixtures import HEALTH, LMFORGE, UiProcess, child_env, free_ports

from pipelines.stages.runner import STAGES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (chromium, chromium-browser or google-chrome) on PATH; "
                             "`make browser-deps` installs Debian's chromium")
# small enough to finish in about a minute, still every stage
TINY = ["train.max_steps=5", "eval.max_windows=4", "ingest.sources=[{kind: stdlib, doc_chars: 2000, max_docs: 120}]"]


@pytest.fixture(scope="module")
def after_a_run(tmp_path_factory):
    """(workspace, ports, the UI process) once `lmforge ui` answers and `lmforge run` has finished."""
    root = tmp_path_factory.mktemp("browser")
    ws, ports = root / "ws", dict(zip(HEALTH, free_ports(3)))
    ws.mkdir()
    ui = UiProcess(ws, ports)
    try:
        ui.wait_ready()
        # the run reports to the UI's Prefect server (no temporary one), its links point at these UIs
        env = child_env(drop=("PREFECT_HOME",), PREFECT_API_URL=f"http://127.0.0.1:{ports['prefect']}/api",
                        LMFORGE_PREFECT_UI_URL=f"http://127.0.0.1:{ports['prefect']}",
                        LMFORGE_MLFLOW_UI_URL=f"http://127.0.0.1:{ports['mlflow']}")
        done = subprocess.run([LMFORGE, "run", "-c", "tiny", "--workspace", str(ws), *TINY], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield ws, ports, ui
    finally:
        ui.stop()


def _prefect(ports, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{ports['prefect']}/api{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _registration(ws) -> dict:
    (path,) = (ws / "artifacts" / "register").glob("*/registration.json")
    return json.loads(path.read_text())


def _mlflow_run_tags(ws, run_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri).get_run(run_id).data.tags


def _render(url: str, tmp_path) -> str:
    """The page's DOM after its scripts ran (the UIs are single-page apps that fetch from their APIs)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_flow_run_and_mlflow_run_link_each_other(after_a_run):
    ws, ports, _ = after_a_run
    (flow_run,) = _prefect(ports, "/flow_runs/filter", {})
    assert flow_run["state_type"] == "COMPLETED"
    registration = _registration(ws)
    run_id = registration["run_id"]

    tags = _mlflow_run_tags(ws, run_id)
    assert tags["prefect.flow_run_id"] == flow_run["id"]
    assert tags["prefect.flow_run_url"] == f"http://127.0.0.1:{ports['prefect']}/runs/flow-run/{flow_run['id']}"

    artifacts = _prefect(ports, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    run_url = f"http://127.0.0.1:{ports['mlflow']}/#/experiments/{registration['experiment_id']}/runs/{run_id}"
    linked = {a["key"].removesuffix("-mlflow") for a in artifacts if a["task_run_id"] and run_url in str(a["data"])}
    assert linked == set(STAGES), f"stages whose task run does not link to the MLflow run: {set(STAGES) - linked}"
    outputs = sorted(a["key"] for a in artifacts if a["key"].endswith("-output"))
    assert outputs == sorted(f"{name}-output" for name in STAGES), "a stage's output artifact is missing or written twice"
    assert any(a["key"] == "mlflow-run" and run_url in str(a["data"]) for a in artifacts)


@needs_chromium
def test_prefect_ui_shows_the_flow_run(after_a_run, tmp_path):
    ws, ports, _ = after_a_run
    (flow_run,) = _prefect(ports, "/flow_runs/filter", {})
    # the link the MLflow run carries, followed as a person would
    page = _render(_mlflow_run_tags(ws, _registration(ws)["run_id"])["prefect.flow_run_url"], tmp_path)
    assert flow_run["name"] in page, "the Prefect UI did not render the flow run"
    assert "lmforge-pipeline" in page and "Completed" in page


@needs_chromium
def test_mlflow_ui_shows_the_run_and_its_registered_model(after_a_run, tmp_path):
    ws, ports, _ = after_a_run
    registration = _registration(ws)
    name, version = registration["model_name"], registration["version"]
    base = f"http://127.0.0.1:{ports['mlflow']}"

    model_page = _render(f"{base}/#/models/{name}", tmp_path)
    assert f"{name}/versions/{version}" in model_page, "the registered model's version is not listed"
    assert "candidate" in model_page

    run_page = _render(f"{base}/#/experiments/{registration['experiment_id']}/runs/{registration['run_id']}", tmp_path)
    assert "prefect.flow_run_url" in run_page, "the run page does not show the link to the flow run"
    assert f"{name}/versions/{version}" in run_page, "the run page does not show the model it registered"
