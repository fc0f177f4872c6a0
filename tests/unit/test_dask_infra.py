"""No Docker here: check the Dask cluster's compose file and image for what would break a run on it — the
dask version (client, scheduler and workers must agree), the ports, and the workspace mounted at its own path."""

from __future__ import annotations

import re
from pathlib import Path

import dask
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"


def test_dask_image_is_pinned_to_the_installed_dask():
    dockerfile = (INFRA / "dask" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert base == f"ghcr.io/dask/dask:{dask.__version__}-py3.11"
    assert "-c /opt/lmforge/constraints.txt" in dockerfile and "torch==2.13.0" in dockerfile
    constraints = (INFRA.parent / "constraints.txt").read_text()
    assert f"dask=={dask.__version__}" in constraints and f"distributed=={dask.__version__}" in constraints


def test_dask_compose_is_well_formed():
    compose = yaml.safe_load((INFRA / "docker-compose.dask.yml").read_text())
    scheduler, worker = compose["services"]["scheduler"], compose["services"]["worker"]
    assert scheduler["image"] == worker["image"] == f"lmforge-dask:{dask.__version__}"
    assert scheduler["build"]["dockerfile"] == "infra/dask/Dockerfile"
    assert all(str(p).startswith("127.0.0.1:") for p in scheduler["ports"]) and "127.0.0.1:8786:8786" in scheduler["ports"]
    assert worker["command"][:3] == ["dask", "worker", "tcp://scheduler:8786"] and "--nthreads" in worker["command"]
    for volume in worker["volumes"]:  # tasks pass paths: each path must be the same inside the container
        host, inside, *_ = _split_var_volume(volume)
        assert re.sub(r":\?[^}]*", "", host) == inside, volume


def _split_var_volume(volume: str) -> list[str]:
    """'${A:?msg}:${A}:ro' -> ['${A:?msg}', '${A}', 'ro'] (the colon inside ${...} is not a separator)."""
    parts, depth, current = [], 0, ""
    for ch in volume:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == ":" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]
