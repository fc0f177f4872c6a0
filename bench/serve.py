"""`lmforge serve` under load on loopback: requests/s and p50/p95 latency with 8 concurrent clients, vs
one client sending the same kind of requests one after another (the baseline; ratio = 8 / 1 req/s).

The server is a subprocess started the way a user starts it, on a random-weight model built in-process
(bench.generate.build_model_dir). Clients are threads with their own HTTP connection; every request
is a plain (non-stream) completion of `--max-tokens` sampled tokens with its own seed. The two phases
alternate within each repeat; req/s are medians over repeats, latencies are pooled.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.generate import MODEL, build_model_dir

NAME = "bench"


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench serve")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import httpx

    root = Path(tempfile.mkdtemp(prefix="lmforge-bench-serve-"))
    model_dir = build_model_dir(root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = root / "server.log"  # a file, not a pipe: nobody reads a pipe while the server logs every request
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--model", str(model_dir), "--port", str(port),
                               "--name", NAME], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(server, base, log)
        prompts = [f"def handler_{i}(request):\n" + "    # " + "step " * (i % 5) for i in range(64)]

        def request(client: httpx.Client, i: int) -> float:
            body = {"model": NAME, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                    "temperature": 0.8, "seed": i}
            started = time.perf_counter()
            response = client.post(f"{base}/v1/completions", json=body, timeout=120)
            response.raise_for_status()
            assert response.json()["usage"]["completion_tokens"] <= args.max_tokens
            return time.perf_counter() - started

        def phase(clients: int, per_client: int) -> tuple[float, list[float]]:
            def worker(c: int) -> list[float]:
                with httpx.Client() as client:
                    return [request(client, c * per_client + j) for j in range(per_client)]

            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                latencies = [t for batch in pool.map(worker, range(clients)) for t in batch]
            return len(latencies) / (time.perf_counter() - started), latencies

        phase(2, 2)  # warm-up: first requests pay for lazy imports and allocator growth
        rps: dict[str, list[float]] = {"one_client": [], "concurrent": []}
        latencies: dict[str, list[float]] = {"one_client": [], "concurrent": []}
        for _ in range(args.repeats):
            for name, clients, per_client in (("one_client", 1, args.requests_per_client),
                                              ("concurrent", args.clients, args.requests_per_client)):
                r, lat = phase(clients, per_client)
                rps[name].append(r)
                latencies[name] += lat
        health = httpx.get(f"{base}/health").json()
    finally:
        server.terminate()
        server.wait(timeout=30)

    def summary(name: str) -> dict:
        lat = sorted(latencies[name])
        return {"requests_per_s": round(statistics.median(rps[name]), 2),
                "requests_per_s_runs": [round(r, 2) for r in rps[name]],
                "p50_latency_ms": round(1000 * _percentile(lat, 50), 1),
                "p95_latency_ms": round(1000 * _percentile(lat, 95), 1),
                "requests": len(lat)}

    one, many = summary("one_client"), summary("concurrent")
    return {
        "benchmark": "serve",
        "ratio": round(many["requests_per_s"] / one["requests_per_s"], 2),
        "baseline": "1 client, requests one after another, same server and request mix",
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "concurrent": many,
        "one_client": one,
        "tokens_generated": health["tokens_generated"],
        "model": MODEL,
        "machine": {"cpus": os.cpu_count(), "server_threads": "OMP_NUM_THREADS=1", "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }


def _wait(server: subprocess.Popen, base: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not answer /health within 120 s")


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
