"""The stages: one module each, `run(cfg, ws, *inputs) -> StageResult`, and the runner that wires them into
the DAG (`runner.run_pipeline`). Stages use the data library (pipelines.data); applications
(pipelines.apps) use finished stages. Neither direction goes the other way.
"""

STAGES = ("ingest", "dedup", "split", "tokenizer", "shard", "pretrain", "evaluate", "export", "register")
