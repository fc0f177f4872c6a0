"""A tiny exported model and `lmforge serve` on it, as a user starts it (test_serve, test_serve_openai,
test_lm_eval, test_mlflow_model).

The model is built here: a SentencePiece tokenizer trained on stdlib source and a tiny GPT with random
weights, saved as an export directory (optionally with its Hugging Face copy under hf/). What it says is
nonsense, but it is deterministic, so answers can be checked against lm_core called in-process.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

from lm_core.model import GPT, GPTConfig
from lm_core.tokenizer import TokenizerConfig, train_tokenizer
from lm_core.weights import save_model_dir

_SCRIPT = Path(sys.executable).with_name("lmforge")
LMFORGE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "flows.cli"]


def build_export(root: Path, block_size: int = 512, hf: bool = False) -> Path:
    """root/export: weights, tokenizer, config.json, chat template (+ hf/ with `hf`)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    lines = [line for f in files for line in f.read_text(errors="ignore").splitlines(keepends=True)]
    tok_path = train_tokenizer(TokenizerConfig(vocab_size=512, num_threads=1), iter(lines), root / "tokenizer.model")
    torch.manual_seed(0)
    # untied: with tied embeddings a random model just repeats its last token
    model = GPT(GPTConfig(vocab_size=512, block_size=block_size, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False))
    export = save_model_dir(model, tok_path, root / "export")
    if hf:
        from lm_core.hf_export import save_hf_dir

        save_hf_dir(model, tok_path, export / "hf")
    return export


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def lmforge_serve(model_dir: Path, name: str, *args: str, timeout: float = 90) -> Iterator[str]:
    """`lmforge serve` on a free loopback port until the block ends; yields the base URL."""
    port = free_port()
    log = model_dir.parent / f"server-{port}.log"  # a file: a pipe nobody reads would block the server once full
    with log.open("w") as out:
        proc = subprocess.Popen([*LMFORGE, "serve", "--model", str(model_dir), "--port", str(port), "--name", name, *args],
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
