"""Process set-up, once for every entry point: the environment the services read when they are imported,
and logging."""

from __future__ import annotations

import logging
import os

from pipelines.workspace import Workspace

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_environment(ws: Workspace) -> None:
    """Settings that must be in place before prefect/mlflow are imported."""
    os.environ.setdefault("PREFECT_HOME", str(ws.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lmforge")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class StageFormatter(logging.Formatter):
    """LOG_FORMAT, with the Prefect task or flow run a record comes from named (Prefect's own records carry it
    as an attribute, not in the message: "Finished in state Completed()" would not say which stage)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        return line.replace(": ", f": [{run}] ", 1) if run else line


def setup(ws: Workspace, log: bool = True) -> None:
    """quiet_environment, and INFO logging to the console (HTTP client chatter kept out)."""
    quiet_environment(ws)
    if log:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(StageFormatter(LOG_FORMAT))
        logging.getLogger("httpx").setLevel(logging.WARNING)
