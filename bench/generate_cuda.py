"""`python -m bench generate_cuda` (also what `python -m bench generate --device cuda` runs): the GPU decode
comparison of bench/generate_device.py, kept in its own result file so it never replaces the CPU `generate`
result."""

from __future__ import annotations


def run(argv: list[str]) -> dict:
    from bench.generate import run as run_generate

    return run_generate(["--device", "cuda", *argv])
