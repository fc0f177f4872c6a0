"""Stage 1, ingest: read every configured source into the DuckDB catalog as one snapshot.

The work is split into partitions: groups of small files of one directory, ~ingest.partition_bytes each,
cut where the file names say so (pipelines.data.sources.group_files; a built-in corpus, a remote table or
a source cut by max_docs is one partition). A partition's key hashes its source's config, the screening
settings, its files' paths, sizes and mtimes, and this code's version, so it changes only when one of its
files does. `ingest_partition` reads one partition into Parquet files under
`artifacts/ingest/.partitions/<key>/` and never touches the catalog, so partitions can run anywhere at once
(flow.data_workers local processes, or the Prefect flow's Dask tasks); `run` then loads them into DuckDB in
one process, the catalog's only writer, a few hundred partitions per statement. A partition that an earlier
snapshot already holds is copied from that snapshot in SQL, not read again: a new file in a workspace costs
reading its group only.

Every record read ends up as a document row or a quarantine row with its reason:
`read == documents + quarantined` is checked before the stage is marked complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lm_core.typed_config import to_dict
from pipelines.config import ConfigError, PipelineConfig, SourceConfig
from pipelines.data import catalog, decontam
from pipelines.data.sources import check_source, source_partitions
from pipelines.data.staging import arrow_int64s, arrow_strings, stage_partition
from pipelines.data.task_pool import TaskPool, check_cluster, task_pool
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "ingest", "5"  # 5: staged documents carry their content hash (md5 in the workers)
LOAD_BATCH = 16  # staged partitions loaded into the catalog per INSERT, at most
LOAD_MEMORY_LIMIT = "256MB"  # DuckDB's buffer cap while ingest loads the catalog
COLUMNS = "snapshot, doc_id, source, uri, text, n_bytes, content_hash, norm_hash, record_no, partition_key"
BAD_COLUMNS = "snapshot, source, uri, reason, snippet, record_no, partition_key"


@dataclass(frozen=True)
class Partition:
    """One unit of ingest work: files of a source, in order (("",) = the whole source)."""
    source: SourceConfig
    files: tuple[str, ...]
    key: str

    @property
    def uri(self) -> str:
        """The file, or the group's directory and its first and last file."""
        if len(self.files) == 1:
            return self.files[0]
        first, last = Path(self.files[0]), Path(self.files[-1])
        return f"{first.parent}/{{{first.name} .. {last.name}}} ({len(self.files)} files)"

    @property
    def name(self) -> str:
        more = f" +{len(self.files) - 1}" if len(self.files) > 1 else ""
        return f"{self.source.label}:{Path(self.files[0]).name or self.source.kind}{more}"


def partitions(cfg: PipelineConfig) -> list[Partition]:
    """Every partition of the configured sources, in source order then file order."""
    ing = cfg.ingest
    screen = {"min_chars": ing.min_chars, "max_chars": ing.max_chars, "normalize": to_dict(ing.normalize)}
    out = []
    for src in ing.sources:
        for files, fingerprint in source_partitions(src, ing.partition_bytes):
            payload = {"version": VERSION, "source": to_dict(src), "screen": screen, "files": fingerprint}
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
            out.append(Partition(src, files, digest))
    return out


def key(cfg: PipelineConfig, parts: list[Partition] | None = None) -> str:
    return stage_key(STAGE, VERSION, cfg.ingest, extra=[p.key for p in (partitions(cfg) if parts is None else parts)])


def preflight(cfg: PipelineConfig) -> None:
    """Before any work: every source and every eval set of dedup.decontaminate can be read, and the Dask
    cluster named by flow.dask_address (which runs ingest and dedup) answers."""
    for src in cfg.ingest.sources:
        check_source(src)
    decontam.preflight(cfg.dedup.decontaminate)
    check_cluster(cfg.flow)


def staged_dir(ws: Workspace, partition: Partition) -> Path:
    return ws.artifacts / STAGE / ".partitions" / partition.key


def pending_partitions(cfg: PipelineConfig, ws: Workspace, force: bool = False) -> list[Partition]:
    """The partitions no earlier snapshot holds: the ones a new snapshot has to read."""
    parts = partitions(cfg)
    if force or not parts:
        return parts
    with ws.duckdb() as con:
        catalog.ensure_schema(con)
        held = {k for (k,) in catalog.rows(con, "SELECT DISTINCT partition_key FROM ingest_partitions")}
    return [p for p in parts if p.key not in held]


def ingest_partition(cfg: PipelineConfig, ws: Workspace, partition: Partition) -> dict:
    """Read and screen one partition into docs.parquet + quarantine.parquet (+ counts.json); reuse them
    when already staged. Touches no catalog: safe to run in many processes at once."""
    return stage_partition(*_stage_args(cfg, ws, partition))


def _stage_args(cfg: PipelineConfig, ws: Workspace, partition: Partition) -> tuple:
    """stage_partition's arguments: light ones, so a local worker process does not import pipelines.config
    (and the model code behind it) to unpickle them."""
    ing = cfg.ingest
    return (partition.source, partition.files, ws.downloads, ing.min_chars, ing.max_chars, ing.normalize,
            staged_dir(ws, partition))


def run(cfg: PipelineConfig, ws: Workspace, force: bool = False) -> StageResult:
    parts = partitions(cfg)  # lists and stats every file: once
    snapshot = key(cfg, parts)

    def build(out: Path) -> dict:
        loaded: list[tuple[Partition, dict]] = []
        with ws.duckdb() as con:
            catalog.ensure_schema(con)
            # DuckDB would otherwise keep the loaded rows' pages in memory up to 80% of RAM: peak RSS grew with the
            # corpus; with a cap it writes them out and evicts them
            con.execute(f"SET memory_limit = '{LOAD_MEMORY_LIMIT}'")
            con.begin()
            for table in ("documents", "quarantine", "ingest_partitions"):
                con.execute(f"DELETE FROM {table} WHERE snapshot = ?", [snapshot])
            copied = set() if force else _copy(con, snapshot, [p.key for p in parts])
            for batch in _staged(cfg, ws, [p for p in parts if p.key not in copied]):
                _load(con, snapshot, batch, ws)  # while the workers stage the partitions after these
                loaded += batch
            report = _totals(con, snapshot)
            if report["documents"] == 0:
                con.rollback()
                raise ConfigError(f"the corpus is empty: no source produced a document "
                                  f"({report['quarantine_reasons'] or 'no records'}); check ingest.sources")
            if report.pop("broken"):
                con.rollback()
                raise RuntimeError(f"ingest accounting broke: {report}")
            listing = catalog.rows(con, """SELECT source, uri, partition_key, n_read, n_documents, n_quarantined, reused
                                           FROM ingest_partitions WHERE snapshot = ? ORDER BY source, uri""", [snapshot])
            con.commit()
        for p, _ in loaded:  # the catalog holds the rows now
            shutil.rmtree(staged_dir(ws, p), ignore_errors=True)
        fields = ("source", "uri", "partition_key", "read", "documents", "quarantined", "reused")
        (out / "partitions.json").write_text(json.dumps([dict(zip(fields, row)) for row in listing], indent=2))
        report = {"snapshot": snapshot, **report}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report

    return run_stage(ws, STAGE, snapshot, build, force)


def _copy(con, snapshot: str, keys: list[str]) -> set[str]:
    """Copy the rows of every partition an earlier snapshot holds under this snapshot, set-wise (no file
    is read); returns the keys copied."""
    con.register("wanted_partitions", pa.Table.from_arrays([arrow_strings(keys)], names=["partition_key"]))
    con.execute("""CREATE OR REPLACE TEMP TABLE ingest_reuse AS
                   SELECT partition_key, min(snapshot) AS earlier FROM ingest_partitions
                   WHERE snapshot <> ? AND partition_key IN (SELECT partition_key FROM wanted_partitions) GROUP BY ALL""",
                [snapshot])
    con.unregister("wanted_partitions")
    same = "JOIN ingest_reuse r ON t.snapshot = r.earlier AND t.partition_key = r.partition_key"
    con.execute(f"""INSERT INTO documents ({COLUMNS})
                    SELECT ?, t.doc_id, t.source, t.uri, t.text, t.n_bytes, t.content_hash, t.norm_hash, t.record_no,
                           t.partition_key FROM documents t {same}""", [snapshot])
    con.execute(f"""INSERT INTO quarantine ({BAD_COLUMNS})
                    SELECT ?, t.source, t.uri, t.reason, t.snippet, t.record_no, t.partition_key FROM quarantine t {same}""",
                [snapshot])
    con.execute(f"""INSERT INTO ingest_partitions
                    SELECT ?, t.partition_key, t.source, t.uri, t.n_read, t.n_documents, t.n_quarantined, true
                    FROM ingest_partitions t {same}""", [snapshot])
    return {k for (k,) in catalog.rows(con, "SELECT partition_key FROM ingest_reuse")}


def _staged(cfg: PipelineConfig, ws: Workspace, todo: list[Partition]) -> Iterator[list[tuple[Partition, dict]]]:
    """The partitions with their counts, in order, a few at a time as they are staged (up to LOAD_BATCH): those
    not staged yet (the Prefect flow may have staged them as Dask tasks already) run on the flow's task pool,
    the Dask cluster or flow.data_workers local processes; else here, LOAD_BATCH at a time."""
    pending = [p for p in todo if not (staged_dir(ws, p) / "counts.json").is_file()]
    parallel = len(pending) > 1 and (cfg.flow.task_runner == "dask" or (cfg.flow.data_workers or 1) > 1)
    with task_pool(cfg.flow) if parallel else nullcontext(TaskPool(1)) as pool:
        done = 0  # a staged partition's task just reads its counts.json
        for counts in pool.batches(stage_partition, [_stage_args(cfg, ws, p) for p in todo], LOAD_BATCH):
            yield list(zip(todo[done:done + len(counts)], counts))
            done += len(counts)


def _load(con, snapshot: str, batch: list[tuple[Partition, dict]], ws: Workspace) -> None:
    """Insert the staged rows of a batch of partitions, one statement per table; a row's partition key is
    the name of the directory its Parquet file was staged in."""
    def files(name: str) -> list[str]:
        return [str(staged_dir(ws, p) / name) for p, _ in batch]

    key_of_file = r"regexp_extract(filename, '([^/\\]+)[/\\][a-z]+\.parquet$', 1)"
    con.execute(
        f"""INSERT INTO documents ({COLUMNS})
            SELECT ?, substr(md5(source || '|' || uri), 1, 16), source, uri, text, strlen(text), content_hash, norm_hash,
                   record_no, {key_of_file} FROM read_parquet(?, filename = true)""", [snapshot, files("docs.parquet")])
    con.execute(f"INSERT INTO quarantine ({BAD_COLUMNS}) SELECT ?, source, uri, reason, snippet, record_no, {key_of_file} "
                "FROM read_parquet(?, filename = true)", [snapshot, files("quarantine.parquet")])
    names = ["partition_key", "source", "uri", "n_read", "n_documents", "n_quarantined"]
    con.register("loaded_partitions", pa.Table.from_arrays(
        [arrow_strings([p.key for p, _ in batch]), arrow_strings([p.source.label for p, _ in batch]),
         arrow_strings([p.uri for p, _ in batch]),
         *(arrow_int64s([c[k] for _, c in batch]) for k in ("read", "documents", "quarantined"))], names=names))
    con.execute("""INSERT INTO ingest_partitions SELECT ?, partition_key, source, uri, n_read, n_documents, n_quarantined, false
                   FROM loaded_partitions""", [snapshot])
    con.unregister("loaded_partitions")


def _totals(con, snapshot: str) -> dict:
    """The snapshot's counts, from the rows themselves and from the partitions' own counts (must agree)."""
    (n_parts, n_reused, read, want_docs, want_bad), = catalog.rows(
        con, """SELECT count(*), count(*) FILTER (WHERE reused), coalesce(sum(n_read), 0),
                       coalesce(sum(n_documents), 0), coalesce(sum(n_quarantined), 0)
                FROM ingest_partitions WHERE snapshot = ?""", [snapshot])
    documents, n_bytes = catalog.rows(con, "SELECT count(*), coalesce(sum(n_bytes), 0) FROM documents WHERE snapshot = ?",
                                      [snapshot])[0]
    reasons = dict(catalog.rows(con, "SELECT reason, count(*) FROM quarantine WHERE snapshot = ? GROUP BY ALL ORDER BY 1",
                                [snapshot]))
    quarantined = sum(reasons.values())
    broken = (documents, quarantined) != (want_docs, want_bad) or read != documents + quarantined
    return {"read": int(read), "documents": int(documents), "quarantined": int(quarantined), "bytes": int(n_bytes),
            "quarantine_reasons": reasons, "partitions": int(n_parts), "partitions_read": int(n_parts - n_reused),
            "partitions_reused": int(n_reused), "broken": broken}
