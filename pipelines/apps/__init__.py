"""Applications built on finished stages: serving, the registry (`lmforge models`), inspect, sweep,
continue, the run summary, GGUF export, and the CLI commands that need no Prefect.
"""
