"""What `lmforge models list|show|promote` does: the workspace's MLflow model registry, for people.

Each function returns plain data (tests read it); `format_*` turn it into the text the CLI prints.
"""

from __future__ import annotations

import time

from pipelines import mlflow_store
from pipelines.mlflow_store import GATE_TAGS
from pipelines.workspace import Workspace


class RegistryError(LookupError):
    """A model, version or alias that is not in the registry; the message says what to do."""


def _client(ws: Workspace):
    try:
        return mlflow_store.client(ws, must_exist=True)
    except LookupError as exc:
        raise RegistryError(str(exc)) from None


def _registered(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none yet"
        raise RegistryError(f"no registered model '{name}'; registered models: {known}") from None


def _row(mv, aliases: dict[str, str]) -> dict:
    tags = mv.tags
    return {
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mv.creation_timestamp / 1000)),
        "run_id": mv.run_id,
        "config_name": tags.get("lmforge.config_name", ""),
        "gate": {t: tags.get(f"lmforge.gate.{t}") for t in GATE_TAGS},
    }


def list_versions(ws: Workspace, name: str | None = None) -> list[dict]:
    """Every version of one registered model (or of all), oldest first, with aliases and gate decisions."""
    client = _client(ws)
    models = [_registered(client, name)] if name else client.search_registered_models()
    rows = []
    for model in models:
        versions = client.search_model_versions(f"name='{model.name}'")
        rows += [_row(mv, model.aliases) for mv in sorted(versions, key=lambda v: int(v.version))]
    return rows


def resolve(client, ref: str):
    """NAME@ALIAS, NAME/VERSION or NAME (its champion, else its newest version) -> a ModelVersion."""
    from mlflow.exceptions import MlflowException

    if "@" in ref:
        name, alias = ref.split("@", 1)
        aliases = _registered(client, name).aliases
        if alias not in aliases:
            raise RegistryError(f"'{name}' has no alias '{alias}'; its aliases: {', '.join(sorted(aliases)) or 'none'}")
        return client.get_model_version(name, aliases[alias])
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        _registered(client, name)
        try:
            return client.get_model_version(name, version)
        except MlflowException:
            raise RegistryError(f"'{name}' has no version '{version}'; see `lmforge models list {name}`") from None
    model = _registered(client, ref)
    if "champion" in model.aliases:
        return client.get_model_version(ref, model.aliases["champion"])
    versions = client.search_model_versions(f"name='{ref}'")
    return max(versions, key=lambda v: int(v.version))


def show(ws: Workspace, ref: str) -> dict:
    """One version in full: aliases, gate decision, lineage tags, its run's eval metrics."""
    client = _client(ws)
    mv = resolve(client, ref)
    row = _row(mv, _registered(client, mv.name).aliases)
    row["tags"] = dict(sorted(mv.tags.items()))
    row["source"] = mv.source
    row["eval"] = {}
    if mv.run_id:
        metrics = client.get_run(mv.run_id).data.metrics
        row["eval"] = {k.removeprefix("eval."): v for k, v in sorted(metrics.items()) if k.startswith("eval.")}
    return row


def promote(ws: Workspace, name: str, version: str, alias: str = "champion") -> dict:
    """Point `alias` at `version` by hand (overriding the gate); the version's tags record it."""
    client = _client(ws)
    model = _registered(client, name)
    resolve(client, f"{name}/{version}")  # the version exists
    previous = model.aliases.get(alias)
    previous = None if previous is None else str(previous)
    client.set_registered_model_alias(name, alias, str(version))
    if alias == "champion":
        client.set_model_version_tag(name, str(version), "lmforge.gate.decision", "promoted by hand")
        client.set_model_version_tag(name, str(version), "lmforge.gate.reason",
                                     f"`lmforge models promote` at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
                                     f" (champion was v{previous})")
    return {"name": name, "alias": alias, "version": str(version), "previous": previous}


def format_list(rows: list[dict]) -> str:
    if not rows:
        return "no registered models yet; `lmforge run` registers one"
    header = ("model", "version", "aliases", "created (UTC)", "gate", "metric", "value", "vs champion", "config")
    lines = [header]
    for r in rows:
        g = r["gate"]
        has_champion = g.get("champion_version") not in (None, "None")
        against = f"v{g['champion_version']}: {_short(g['champion_value'])}" if has_champion else "-"
        lines.append((r["name"], r["version"], ",".join(r["aliases"]) or "-", r["created"], g.get("decision") or "-",
                      g.get("metric") or "-", _short(g.get("value")), against, r["config_name"] or "-"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def format_show(row: dict) -> str:
    lines = [f"{row['name']} version {row['version']}  aliases: {', '.join(row['aliases']) or '-'}",
             f"  created: {row['created']} UTC   run: {row['run_id']}   source: {row['source']}"]
    g = row["gate"]
    if g.get("decision"):
        lines.append(f"  gate: {g['decision']} — {g.get('reason')}")
    if row["eval"]:
        lines.append("  eval: " + ", ".join(f"{k}={_short(v)}" for k, v in row["eval"].items()))
    lines.append("  tags:")
    lines += [f"    {k} = {v}" for k, v in row["tags"].items() if not k.startswith("lmforge.gate.")]
    return "\n".join(lines)


def _short(value) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value) if value not in (None, "None") else "-"
