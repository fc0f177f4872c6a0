"""flows: Prefect wiring (tasks, cache keys, the pipeline flow) and the `lmforge` CLI. Thin."""
