"""Comparing experiments: a grid of config overrides, each point a full pipeline run in one workspace,
then a table, a plot of validation bits per byte vs training compute, and a power-law fit, logged to
MLflow (experiment `lmforge-sweep`).

The points share the workspace on purpose: a stage's key hashes only its own config and its inputs'
keys, so a grid over the model or the optimizer leaves ingest … shard with the same keys for every
point; they are built by the first point and reused by the rest. The flow (flows/sweep.py) runs each
point as a `lmforge-pipeline` subflow; `run_sweep` without a `run_point` calls the stages plainly.

Compute is training FLOPs, flops_per_token (6 per matmul weight + attention) × tokens trained.
The fit runs on the frontier (the best loss at each distinct compute; a grid over lr gives several
losses per compute) and needs at least 3 distinct compute values (4 with an irreducible term).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lm_core.typed_config import ConfigError
from pipelines.apps.scaling_fit import FIT_METRIC, PowerLaw, fit_rows
from pipelines.config import PipelineConfig, load_config
from pipelines.stages.runner import preflight, run_pipeline
from pipelines.workspace import StageResult, Workspace

SWEEP_EXPERIMENT = "lmforge-sweep"
TABLE_FILE, CSV_FILE, PLOT_FILE, FIT_FILE = "comparison.json", "comparison.csv", "bpb_vs_compute.png", "fit.json"
NUMERIC_COLUMNS = ("params", "non_embedding_params", "flops_per_token", "tokens", "compute_flops", "val_bpb", "val_loss",
                   "train_seconds", "point_seconds")


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """`["model.n_embd=64,128", "train.lr=1e-3,3e-3"]` -> {"model.n_embd": ["64", "128"], "train.lr": [...]}.
    Values stay text (YAML, as in a KEY=VALUE override); commas inside [...] / {...} / quotes do not split."""
    if not specs:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2,... (e.g. --grid model.n_embd=64,128)")
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--grid '{spec}' must look like KEY=V1,V2,... e.g. --grid model.n_embd=64,128")
        if key == "workspace":
            raise ConfigError("--grid workspace=...: all points of a sweep share one workspace (that is how they reuse "
                              "the data stages); pass --workspace DIR once instead")
        values = _split_values(raw)
        if "" in values:
            raise ConfigError(f"--grid '{spec}' has an empty value; write {key}=V1,V2 with no blank entries")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"--grid {key} lists {', '.join(repeated)} more than once; list each value once")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; put all its values in one: "
                              f"--grid {key}={','.join(grid[key] + values)}")
        grid[key] = values
    return grid


def _split_values(raw: str) -> list[str]:
    values, depth, quote, current = [], 0, "", ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    return values + [current.strip()]


@dataclass(frozen=True)
class SweepPoint:
    label: str  # "model.n_embd=64 train.lr=1e-3": the grid's values for this point
    overrides: tuple[str, ...]  # the grid's KEY=VALUE overrides, applied after the base overrides
    cfg: PipelineConfig


@dataclass(frozen=True)
class SweepPlan:
    config: str  # the base config: a name under configs/ or a YAML path
    overrides: tuple[str, ...]
    grid: dict[str, list[str]]
    points: tuple[SweepPoint, ...]
    sweep_id: str  # hash of the points' config hashes: the same sweep has the same id

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.points[0].cfg.workspace)


def plan(config: str, grid_specs: Sequence[str], overrides: Sequence[str] = ()) -> SweepPlan:
    """Resolve and check every point's config before any work starts (and before Prefect needs the workspace)."""
    grid = parse_grid(grid_specs)
    for key in set(grid) & {o.partition("=")[0].strip() for o in overrides}:
        raise ConfigError(f"{key} is both a --grid key and a KEY=VALUE override; drop the override or give the grid that value")
    points, seen = [], {}
    for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in grid.items()]):
        point_overrides = tuple(f"{k}={v}" for k, v in combo)
        label = " ".join(point_overrides)
        try:
            cfg = load_config(config, [*overrides, *point_overrides])
        except ConfigError as exc:
            raise ConfigError(f"sweep point '{label}': {exc}") from None
        if cfg.config_hash() in seen:
            raise ConfigError(f"sweep points '{seen[cfg.config_hash()]}' and '{label}' resolve to the same config; "
                              "list distinct values in --grid")
        seen[cfg.config_hash()] = label
        points.append(SweepPoint(label, point_overrides, cfg))
    for point in points:  # sources readable, files named exist; makes the workspace directory (Prefect's home)
        try:
            preflight(point.cfg)
        except ConfigError as exc:
            raise ConfigError(f"sweep point '{point.label}': {exc}") from None
    sweep_id = hashlib.sha256("|".join(seen).encode()).hexdigest()[:12]
    return SweepPlan(str(config), tuple(overrides), grid, tuple(points), sweep_id)


@dataclass(frozen=True)
class PointOutcome:
    point: SweepPoint
    results: dict[str, StageResult]
    seconds: float  # wall time of this point's pipeline run (reused stages cost ~nothing)


PointRun = Callable[[SweepPoint, dict[str, str]], dict[str, StageResult]]  # (point, its model's tags) -> results


def run_sweep(sweep: SweepPlan, run_point: PointRun | None = None) -> list[PointOutcome]:
    """Run the points one after another (they would only compete for the same cores); plainly by default."""
    run_point = run_point or (lambda point, tags: run_pipeline(point.cfg, tags=tags))
    outcomes = []
    for point in sweep.points:
        started = time.perf_counter()
        results = run_point(point, {"lmforge.sweep_id": sweep.sweep_id, "lmforge.sweep_point": point.label})
        outcomes.append(PointOutcome(point, results, time.perf_counter() - started))
    return outcomes


def comparison(outcomes: Sequence[PointOutcome]) -> list[dict[str, Any]]:
    """One row per point: its grid values, size, compute, validation numbers and where its model is."""
    rows = []
    for o in outcomes:
        model, pretrain, evaluate = o.point.cfg.model, o.results["pretrain"], o.results["evaluate"]
        tokens, register = int(pretrain.metrics["tokens"]), o.results.get("register")
        rows.append({
            "point": o.point.label,
            **{k: v for k, _, v in (ov.partition("=") for ov in o.point.overrides)},
            "params": model.num_params(),
            "non_embedding_params": model.num_params(exclude_embeddings=True),
            "flops_per_token": model.flops_per_token(),
            "tokens": tokens,
            "compute_flops": float(model.flops_per_token()) * tokens,
            "val_bpb": float(evaluate.metrics["val_bpb"]),
            "val_loss": float(evaluate.metrics["val_loss"]),
            "train_seconds": float(pretrain.metrics.get("wall_seconds", 0.0)),
            "point_seconds": round(o.seconds, 2),
            "pretrain_key": pretrain.key,
            "upstream_reused": all(o.results[s].reused for s in ("ingest", "dedup", "split", "tokenizer", "shard")),
            "model_version": register.metrics.get("version", "") if register else "",
            "model_run_id": register.metrics.get("run_id", "") if register else "",
        })
    return rows


@dataclass
class SweepSummary:
    rows: list[dict[str, Any]]
    fit: PowerLaw | None
    fit_note: str  # why there is no fit, or which points it used
    run_id: str = ""  # the comparison's MLflow run (experiment SWEEP_EXPERIMENT)
    tracking_uri: str = ""


def log_comparison(ws: Workspace, rows: list[dict[str, Any]], fit: PowerLaw | None, *, sweep: SweepPlan | None = None,
                   fit_note: str = "", tags: dict[str, str] | None = None) -> str:
    """A run in `lmforge-sweep` with the table (MLflow table + CSV), the plot, the fit, and a child run
    per point (grid values as params: MLflow's own run comparison works on them). Returns the run id."""
    import mlflow

    from pipelines import mlflow_store

    mlflow_store.configure(ws)
    experiment = mlflow_store.experiment(mlflow.MlflowClient(), ws, SWEEP_EXPERIMENT)
    run_tags = {**({"lmforge.sweep_id": sweep.sweep_id} if sweep else {}), **(tags or {})}
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=f"sweep-{sweep.sweep_id[:8] if sweep else ''}",
                          tags=run_tags) as run:
        params = {"points": len(rows), "fit_metric": FIT_METRIC, "fit_note": fit_note[:500]}
        if sweep:
            params.update({"config": sweep.config, "overrides": " ".join(sweep.overrides)[:500] or "-",
                           **{f"grid.{k}": ",".join(v)[:500] for k, v in sweep.grid.items()}})
        mlflow.log_params(params)
        mlflow.log_metric(f"best_{FIT_METRIC}", min(r[FIT_METRIC] for r in rows))
        if fit:
            mlflow.log_metrics({"fit_a": fit.a, "fit_b": fit.b, "fit_e": fit.e, "fit_r2": fit.r2, "fit_points": fit.n})
        mlflow.log_table(data={col: [r.get(col) for r in rows] for col in _columns(rows)}, artifact_file=TABLE_FILE)
        with tempfile.TemporaryDirectory() as tmp:
            write_csv(rows, Path(tmp) / CSV_FILE)
            plot(rows, fit, Path(tmp) / PLOT_FILE)
            (Path(tmp) / FIT_FILE).write_text(json.dumps({"fit": asdict(fit) if fit else None, "note": fit_note,
                                                         "formula": fit.formula() if fit else None}, indent=2))
            for f in (CSV_FILE, PLOT_FILE, FIT_FILE):
                mlflow.log_artifact(str(Path(tmp) / f))
        for row in rows:
            with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=row["point"], nested=True,
                                  tags={**run_tags, "lmforge.pretrain_key": row["pretrain_key"],
                                        "lmforge.model_run_id": row["model_run_id"]}):
                mlflow.log_params({k: row[k] for k in _grid_columns(rows)})
                mlflow.log_metrics({k: float(row[k]) for k in NUMERIC_COLUMNS})
    return run.info.run_id


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _grid_columns(rows: list[dict[str, Any]]) -> list[str]:
    return [k for k in _columns(rows) if "." in k]  # grid keys are dotted config keys


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], fit: PowerLaw | None, path: Path) -> None:
    """Bits per byte vs compute, both log scale (a power law is a straight line), with the fitted curve."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    on = np.array([r.get("on_frontier", True) for r in rows])
    c, y = np.array([r["compute_flops"] for r in rows]), np.array([r[FIT_METRIC] for r in rows])
    ax.scatter(c[on], y[on], label="best at its compute", zorder=3)
    if not on.all():
        ax.scatter(c[~on], y[~on], marker="x", color="gray", label="other points", zorder=3)
    for r in rows:
        text = " ".join(f"{k.split('.')[-1]}={r[k]}" for k in _grid_columns(rows))
        ax.annotate(text, (r["compute_flops"], r[FIT_METRIC]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if fit:
        xs = np.geomspace(c.min() / 1.5, c.max() * 1.5, 100)
        ax.plot(xs, fit.predict(xs), "--", color="C1", label=fit.formula())
    ax.set(xscale="log", yscale="log", title=f"lmforge sweep: {len(rows)} points", ylabel=f"validation bits per byte ({FIT_METRIC})",
           xlabel="training compute (FLOPs = flops_per_token x tokens)")
    for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_format(FormatStrFormatter("%.2f"))  # bpb is near 1..10: plain numbers, not 4.5x10^0
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def compare_and_log(sweep: SweepPlan, outcomes: Sequence[PointOutcome], irreducible: bool = False,
                    tags: dict[str, str] | None = None) -> SweepSummary:
    rows = comparison(outcomes)
    fit, note = fit_rows(rows, irreducible)
    run_id = log_comparison(sweep.workspace, rows, fit, sweep=sweep, fit_note=note, tags=tags)
    return SweepSummary(rows, fit, note, run_id, tracking_uri=sweep.workspace.mlflow_uri)


def markdown(summary: SweepSummary) -> str:
    """The comparison as a Markdown table (the flow publishes it as a Prefect artifact)."""
    cols = ["point", "params", "compute_flops", "val_bpb", "val_loss", "train_seconds", "pretrain_key"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in summary.rows]
    return "\n".join(lines) + f"\n\n{summary.fit.formula() if summary.fit else summary.fit_note}\n"


def print_comparison(summary: SweepSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep: {len(summary.rows)} points (best {FIT_METRIC} in bold)")
    grid_cols = _grid_columns(summary.rows)
    shown = [(k.split(".")[-1], k) for k in grid_cols] + [
        ("params", "params"), ("non-emb", "non_embedding_params"), ("tokens", "tokens"), ("FLOPs", "compute_flops"),
        ("bpb", "val_bpb"), ("loss", "val_loss"), ("train s", "train_seconds"), ("pretrain", "pretrain_key"),
        ("data reused", "upstream_reused")]
    for header, key in shown:
        table.add_column(header, justify="left" if key == "pretrain_key" else "right")
    best = min(r[FIT_METRIC] for r in summary.rows)
    for r in summary.rows:
        cells = [str(r[k])[:8] if k == "pretrain_key" else str(r[k]) if k in grid_cols else _fmt(r[k]) for _, k in shown]
        table.add_row(*cells, style="bold" if r[FIT_METRIC] == best else None)
    console = Console()
    if not console.is_terminal:  # piped or logged: no terminal width to fit, keep the columns whole
        console = Console(width=160)
    console.print(table)
    console.print(f"fit: {summary.fit.formula()}" if summary.fit else summary.fit_note)
    if summary.run_id:
        console.print(f"logged to MLflow: experiment {SWEEP_EXPERIMENT}, run {summary.run_id} ({summary.tracking_uri})")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value / 1e6:.3g}M" if abs(value) >= 1e6 else f"{value / 1e3:.3g}k"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e6 else f"{value:.4g}"
    return str(value)


def run_and_compare(sweep: SweepPlan, irreducible: bool = False) -> SweepSummary:
    """The sweep without Prefect: the points as plain pipeline runs, then the comparison."""
    return compare_and_log(sweep, run_sweep(sweep), irreducible)

