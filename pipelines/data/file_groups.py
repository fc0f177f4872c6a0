"""Small files grouped into ingest partitions that scale with bytes, not files.

Files are grouped within a directory, in path order, and a group ends after a file chosen by the hash of its
name with probability size / budget (content-defined cut points, as in content-defined chunking): groups
hold ~budget bytes, and a group's files (so its partition key) change only when one of its own files, or a
cut point next to it, changes; a new or edited file never regroups the rest of the directory.
"""

from __future__ import annotations

import hashlib
import os

PARTITION_MAX_FILES = 20_000  # a hard cap as well (4x the byte budget too): cut points resume after it


def group_files(files: list, budget: int) -> list[list]:
    """Consecutive (path, stat) pairs grouped: a group never spans two directories and ends after a file
    whose name hashes below size / budget, or at 4x the budget or PARTITION_MAX_FILES files."""
    groups, current, size = [], [], 0
    parents = [os.path.dirname(path) for path, _ in files]  # strings: Path comparisons cost seconds at 100k files
    for i, (path, st) in enumerate(files):
        current.append((path, st))
        size += st.st_size
        last = i + 1 == len(files) or parents[i + 1] != parents[i]
        if last or cut_after(path.name, st.st_size, budget) or size >= 4 * budget or len(current) >= PARTITION_MAX_FILES:
            groups.append(current)
            current, size = [], 0
    return groups


def cut_after(name: str, size: int, budget: int) -> bool:
    draw = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")
    return draw < (2**64) * min(1.0, size / max(1, budget))
