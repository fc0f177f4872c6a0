"""pipelines: one module per stage, each a plain function `run(cfg, ws, *inputs) -> StageResult`.

Knows DuckDB, MLflow and files; never imports prefect or flows.
"""
