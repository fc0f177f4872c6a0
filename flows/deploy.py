"""`lmforge deploy`: the pipeline flow as a Prefect deployment with a cron schedule.

A deployment stores the run's parameters — `config_name`, dotted `overrides` (the workspace pinned to
an absolute path), `only` / `start` (which stages rerun) and `force` — so the UI's "Run" form and the
schedule start the same run `lmforge run` would. The config is resolved when each run starts, so an
edited YAML is picked up by the next scheduled run.

With `--inbox DIR --tokens N` the deployment is of the continue flow (`flows/continue_flow.py`): each
run ingests the inbox's new files and trains the champion on them, or does nothing when none is new.

`lmforge deploy` registers (or updates) the deployment on the Prefect server in PREFECT_API_URL;
`lmforge deploy --serve` also runs a process that executes its scheduled and UI-triggered runs
(`flow.serve`: no work pool or worker needed). `infra/prefect.yaml` is the same deployment for
`prefect deploy` with a process work pool.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lm_core.typed_config import ConfigError

FLOW_NAME = "lmforge-pipeline"
CONTINUE_FLOW_NAME = "lmforge-continue"


def deployment_parameters(config: str, overrides: list[str], workspace: str | None = None, only: str | None = None,
                          start: str | None = None, force: bool = False) -> dict[str, Any]:
    """The flow parameters of a deployment; the config is loaded once here so a bad one fails now."""
    from pipelines.config import load_config

    cfg = load_config(config, [*overrides, *([f"workspace={workspace}"] if workspace else [])])
    # scheduled runs start in the serving process's directory: pin the workspace that was meant
    pinned = [o for o in overrides if not o.startswith("workspace=")] + [f"workspace={Path(cfg.workspace).resolve()}"]
    config_ref = str(Path(config).resolve()) if Path(config).suffix in (".yaml", ".yml") else config
    return {"config_name": config_ref, "overrides": pinned, "only": only, "start": start, "force": force}


def continue_parameters(parameters: dict[str, Any], inbox: str, tokens: int | None) -> dict[str, Any]:
    """The continue flow's parameters: the pipeline's config reference plus the inbox and the budget."""
    if not tokens or tokens < 1:
        raise ConfigError("--inbox deploys the continue flow, which needs --tokens N (its training budget per run)")
    if parameters["only"] or parameters["start"] or parameters["force"]:
        raise ConfigError("--only/--from/--force are pipeline deployment options; the continue flow (--inbox) "
                          "takes none of them")
    return {"config_name": parameters["config_name"], "overrides": parameters["overrides"],
            "inbox": str(Path(inbox).resolve()), "tokens": tokens}


def build_deployment(name: str, cron: str | None, parameters: dict[str, Any], paused: bool = False):
    """A RunnerDeployment of `lmforge-pipeline` (or `lmforge-continue` when the parameters name an inbox);
    raises ConfigError for a cron Prefect cannot parse."""
    from prefect.deployments.runner import EntrypointType

    from flows.continue_flow import continue_flow
    from flows.pipeline import pipeline_flow

    flow, description = (
        (continue_flow, "lmforge continue: new inbox files -> new snapshot -> the champion trains on -> gate")
        if "inbox" in parameters else
        (pipeline_flow, "lmforge pipeline: ingest → … → register; edit config_name/overrides/only/start/force per run"))
    try:
        return flow.to_deployment(
            name=name, cron=cron, parameters=parameters, paused=paused, tags=["lmforge"],
            description=description,
            # the serving process imports the flow by module path, whatever its working directory
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    except ValueError:
        raise ConfigError(f"--cron {cron!r} is not a valid cron schedule; "
                          "use five fields, e.g. --cron '0 3 * * *' (03:00 every day)") from None


def require_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("deployments live on a Prefect server, and PREFECT_API_URL is not set; start one with "
                          "`lmforge ui` (or `prefect server start`) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def main(args: argparse.Namespace) -> int:
    from pipelines.environment import quiet_environment
    from pipelines.workspace import Workspace

    parameters = deployment_parameters(args.config, list(args.overrides), args.workspace, args.only, args.start, args.force)
    if args.inbox:
        parameters = continue_parameters(parameters, args.inbox, args.tokens)
    # PREFECT_HOME etc. before prefect is imported; the workspace is the last (pinned) override
    ws = Workspace(parameters["overrides"][-1].removeprefix("workspace="))
    ws.root.mkdir(parents=True, exist_ok=True)
    quiet_environment(ws)
    cron = None if args.cron in ("", "none") else args.cron
    deployment = build_deployment(args.name, cron, parameters, paused=args.paused)
    api = require_server()
    deployment_id = deployment.apply()  # creates or updates it
    full_name = f"{CONTINUE_FLOW_NAME if args.inbox else FLOW_NAME}/{args.name}"
    print(f"deployment {full_name} ({deployment_id}) on {api}\n  schedule: {cron or 'none (runs only when triggered)'}"
          f"{' (paused)' if args.paused else ''}\n  parameters: {parameters}")
    if not args.serve:
        print(f"Runs need a process to execute them: `lmforge deploy --serve` with the same arguments, or a worker.\n"
              f"Trigger one now: prefect deployment run '{full_name}'")
        return 0
    print(f"Serving {full_name}: scheduled and UI-triggered runs execute here; Ctrl-C stops.\n"
          f"Trigger one now: prefect deployment run '{full_name}'", flush=True)
    from prefect import serve

    serve(deployment, print_starting_message=False)
    return 0
