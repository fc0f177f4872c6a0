"""pipelines: the stages and what surrounds them, in three rooms and a small foundation.

- stages/  one module per stage, `run(cfg, ws, *inputs) -> StageResult`, and the runner (the DAG)
- data/    the data library the stages use (sources, normalize, quality, near-dup, decontamination, ...)
- apps/    applications built on finished stages (serving, registry, inspect, sweep, continue, CLI)
- config, workspace, mlflow_store, environment: shared by all three

Imports go apps -> stages -> data, each by public name. Knows DuckDB, MLflow and files; never imports
prefect or flows.
"""
