"""BIG-bench tasks, prepared offline from the `bigbench==1.0.0` source archive on PyPI.

The archive (~360 MB) is fetched once with pip into `<workspace>/downloads/`, checked against its
sha256, and streamed: only the task.json files asked for are read out of the tar, into
`<workspace>/downloads/bigbench/<task>/task.json`. A prepared task is never fetched again, so
evaluation runs offline afterwards. Task names are paths under bigbench/benchmark_tasks/, e.g.
`anachronisms` or `logical_deduction/three_objects` (a task with subtasks has examples only in them).

    python -m pipelines.data.bigbench [--workspace DIR] [--archive FILE] TASK [TASK ...]
    python -m pipelines.data.bigbench --list
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tarfile
from pathlib import Path

from pipelines.data.sdist import fetch_sdist
from pipelines.workspace import Workspace

VERSION = "1.0.0"
ARCHIVE = f"bigbench-{VERSION}.tar.gz"
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASKS_DIR = f"bigbench-{VERSION}/bigbench/benchmark_tasks/"
TASK_FILE = "task.json"


def cache_dir(ws: Workspace) -> Path:
    return ws.downloads / "bigbench"


def task_path(ws: Workspace, name: str) -> Path:
    return cache_dir(ws) / name / TASK_FILE


def fetch_archive(downloads: Path) -> Path:
    """The bigbench sdist from the package index, cached and verified."""
    return fetch_sdist(f"bigbench=={VERSION}", ARCHIVE, ARCHIVE_SHA256, downloads,
                       f"Copy {ARCHIVE} into {downloads} or pass --archive FILE")


def _task_name(member: str) -> str | None:
    if member.startswith(TASKS_DIR) and member.endswith("/" + TASK_FILE):
        return member[len(TASKS_DIR) : -len("/" + TASK_FILE)]
    return None


def list_tasks(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:gz") as tar:
        return sorted(name for m in tar if m.isfile() and (name := _task_name(m.name)))


def extract_tasks(archive: Path, names: list[str], out_dir: Path) -> dict[str, Path]:
    """Stream the tar once and write just the named tasks' task.json (atomically) under out_dir."""
    wanted, found, seen = set(names), {}, []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:  # streamed: the archive is never unpacked
            name = _task_name(member.name) if member.isfile() else None
            if name is None:
                continue
            seen.append(name)
            if name in wanted:
                target = out_dir / name / TASK_FILE
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{TASK_FILE}.tmp")
                tmp.write_bytes(tar.extractfile(member).read())
                os.replace(tmp, target)
                found[name] = target
                if len(found) == len(wanted):
                    break
    missing = sorted(wanted - set(found))
    if missing:
        hints = {m: difflib.get_close_matches(m, seen, n=3, cutoff=0.5) for m in missing}
        detail = "; ".join(f"'{m}'" + (f" (did you mean {', '.join(h)}?)" if h else "") for m, h in hints.items())
        raise ValueError(f"no BIG-bench task {detail} in {archive.name}; `python -m pipelines.data.bigbench --list` lists them")
    return found


def prepare(ws: Workspace, names: list[str], archive: Path | None = None) -> dict[str, Path]:
    """Each named task's task.json, extracted on first use; cached ones need neither network nor archive."""
    paths = {name: task_path(ws, name) for name in names}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        archive = archive or fetch_archive(ws.downloads)
        paths.update(extract_tasks(archive, missing, cache_dir(ws)))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.data.bigbench", description="Prepare BIG-bench tasks offline.")
    p.add_argument("tasks", nargs="*", metavar="TASK", help="e.g. anachronisms logical_deduction/three_objects")
    p.add_argument("--workspace", default="workspace")
    p.add_argument("--archive", type=Path, help=f"a local {ARCHIVE} (default: fetched with pip into the workspace)")
    p.add_argument("--list", action="store_true", help="list the task names in the archive")
    args = p.parse_args(argv)
    ws = Workspace(args.workspace)
    try:
        if args.list:
            print("\n".join(list_tasks(args.archive or fetch_archive(ws.downloads))))
            return 0
        if not args.tasks:
            p.error("name at least one TASK (or --list)")
        for name, path in prepare(ws, args.tasks, args.archive).items():
            print(f"{name}: {path}")
    except (ValueError, RuntimeError) as exc:
        print(f"bigbench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
