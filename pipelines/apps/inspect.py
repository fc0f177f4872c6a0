"""`lmforge inspect`: what a trained model learned. Nearest tokens in embedding space and a PNG grid of
attention maps (layer x head) logged to MLflow. (The token-embedding matrix for TensorBoard's projector
is written by the evaluate stage: pipelines.stages.projector.)
"""

from __future__ import annotations

from pathlib import Path

from lm_core.introspect import attention_maps, embedding_matrix, nearest_tokens, resolve_token, surface_variants
from lm_core.tokenizer import Tokenizer
from lm_core.weights import TOKENIZER_FILE, load_model_dir
from pipelines.stages.projector import piece_label
from pipelines.workspace import Workspace

INSPECT_EXPERIMENT = "lmforge-inspect"


def neighbors(model_dir: Path, word: str, k: int = 10) -> dict:
    """The k nearest tokens to `word` by cosine similarity of the embeddings, and where the word's case and
    space variants (that exist as tokens) rank among all tokens."""
    if k < 1:
        raise ValueError(f"--k {k} must be >= 1; pass e.g. --k 10")
    model, meta = load_model_dir(model_dir)
    tok = Tokenizer(Path(model_dir) / TOKENIZER_FILE)
    piece_to_id = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}.get
    token_id = resolve_token(word, piece_to_id, tok.encode)
    emb = embedding_matrix(model)
    ranked = nearest_tokens(emb, token_id, k=emb.size(0) - 1)  # every other token, nearest first
    rank_of = {i: r + 1 for r, (i, _) in enumerate(ranked)}
    piece = tok.id_to_piece(token_id)
    variants = [(v, piece_to_id(v)) for v in surface_variants(piece)]
    return {
        "model": meta.get("name") or Path(model_dir).name,
        "token": {"id": token_id, "piece": piece},
        "neighbors": [{"id": i, "piece": tok.id_to_piece(i), "cosine": round(s, 4)} for i, s in ranked[:k]],
        "variants": [{"id": i, "piece": v, "rank": rank_of[i], "cosine": round(ranked[rank_of[i] - 1][1], 4)}
                     for v, i in variants if i is not None and i != token_id],
        "vocab_size": emb.size(0),
    }


def format_neighbors(found: dict) -> str:
    token = found["token"]
    lines = [f"nearest tokens to {token['piece']!r} (id {token['id']}) by embedding cosine similarity:"]
    lines += [f"  {n + 1:>3}. {row['piece']!r:<20} {row['cosine']:+.4f}" for n, row in enumerate(found["neighbors"])]
    if found["variants"]:
        ranks = ", ".join(f"{v['piece']!r} #{v['rank']}" for v in found["variants"])
        lines.append(f"case/space variants (rank of {found['vocab_size'] - 1}): {ranks}")
    else:
        lines.append("case/space variants: none of them is a token in this vocabulary")
    return "\n".join(lines)


def attention_png(model_dir: Path, prompt: str, out_path: Path) -> dict:
    """A grid of attention maps (rows: layers, columns: heads) for `prompt`, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here
    import matplotlib.pyplot as plt

    model, meta = load_model_dir(model_dir)
    tok = Tokenizer(Path(model_dir) / TOKENIZER_FILE)
    ids = tok.encode(prompt, bos=True)
    if len(ids) > model.cfg.block_size:
        raise ValueError(f"--prompt is {len(ids)} tokens; this model reads at most {model.cfg.block_size} "
                         "(model.block_size): pass a shorter prompt")
    maps = attention_maps(model, ids)  # (L, H, T, T)
    L, H, T, _ = maps.shape
    labels = [piece_label(tok.id_to_piece(i)) for i in ids]
    cell = max(2.0, min(6.0, 0.25 * T))
    fig, axes = plt.subplots(L, H, figsize=(cell * H, cell * L), squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            if T <= 32:  # token labels stay readable only for short prompts
                ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(T), labels, fontsize=6)
            else:
                ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"attention (query rows x key columns): {prompt[:60]!r}", fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return {"png": str(out_path), "layers": L, "heads": H, "tokens": T, "lineage": meta.get("lineage", {})}


def log_attention(ws: Workspace, drawn: dict, model_ref: str, prompt: str) -> str:
    """Log the attention PNG as an artifact of a new run in the `lmforge-inspect` experiment, tagged with
    the model's lineage; returns the run id."""
    import mlflow

    from pipelines import mlflow_store

    mlflow_store.configure(ws)
    experiment = mlflow_store.experiment(mlflow.MlflowClient(), ws, INSPECT_EXPERIMENT)
    tags = {**drawn["lineage"], "lmforge.model_ref": model_ref, "lmforge.inspect": "attention"}
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name="attention", tags=tags) as run:
        mlflow.log_params({"prompt": prompt[:500], "layers": drawn["layers"], "heads": drawn["heads"],
                           "tokens": drawn["tokens"]})
        mlflow.log_artifact(drawn["png"], "attention")
    return run.info.run_id
