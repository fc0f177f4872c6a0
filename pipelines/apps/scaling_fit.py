"""Scaling-law fits for a sweep: L(C) = a * C^-b (or e + a * C^-b) by least squares in log space, on the
frontier of the points (the best loss at each compute)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FIT_METRIC = "val_bpb"  # bits per byte: comparable across tokenizers, unlike loss per token


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = e + a * C**-b, fitted in log L; r2 is measured on log L too (1.0: every point on the curve)."""
    a: float
    b: float
    e: float  # irreducible loss; 0 for the plain power law
    r2: float
    n: int  # points fitted

    def predict(self, compute: Any) -> np.ndarray:
        return self.e + self.a * np.asarray(compute, dtype=np.float64) ** -self.b

    def formula(self) -> str:
        tail = f" + {self.e:.4g}" if self.e else ""
        return f"L(C) = {self.a:.4g} * C^-{self.b:.4g}{tail}  (r2={self.r2:.4f}, {self.n} points)"


def fit_power_law(compute: Sequence[float], loss: Sequence[float], irreducible: bool = False) -> PowerLaw:
    """Least squares in log space: log L = log a - b log C, a straight line. With `irreducible`, also
    the floor e of L = e + a*C^-b: for each e in [0, min L) the line through log(L - e) is closed form,
    so e is found by a 1-D search (a coarse grid, then finer grids around the best) — numpy only."""
    c, y = np.asarray(compute, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if c.shape != y.shape or c.ndim != 1:
        raise ValueError(f"fit_power_law: compute and loss must be equal-length lists, got {c.shape} and {y.shape}")
    need = 4 if irreducible else 2
    if len(c) < need:
        raise ValueError(f"fit_power_law: {len(c)} points; a fit {'with an irreducible term ' if irreducible else ''}"
                         f"needs at least {need}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(y)) and np.all(c > 0) and np.all(y > 0)):
        raise ValueError("fit_power_law: compute and loss must be finite and > 0 (a log-log fit)")
    if np.ptp(np.log(c)) == 0:
        raise ValueError("fit_power_law: every point has the same compute; vary the model size (model.n_embd, "
                         "model.n_layer) or train.max_steps")
    log_c, log_y = np.log(c), np.log(y)

    def line(floor: float) -> tuple[float, float, float]:
        slope, intercept = np.polyfit(log_c, np.log(y - floor), 1)
        residual = np.log(floor + np.exp(intercept) * c ** slope) - log_y
        return float(np.sum(residual ** 2)), float(np.exp(intercept)), float(-slope)

    floor = 0.0
    if irreducible:
        lo, hi = 0.0, float(y.min()) * (1 - 1e-9)
        for _ in range(6):  # each round: 101 candidates, then zoom to the two cells around the best
            grid = np.linspace(lo, hi, 101)
            best = int(np.argmin([line(f)[0] for f in grid]))
            floor = float(grid[best])
            lo, hi = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, 100)])
    sse, a, b = line(floor)
    total = float(np.sum((log_y - log_y.mean()) ** 2))
    r2 = 1.0 - sse / total if total > 0 else (1.0 if sse < 1e-20 else 0.0)
    return PowerLaw(a=a, b=b, e=floor, r2=r2, n=len(c))


def frontier(rows: Sequence[dict[str, Any]], metric: str = FIT_METRIC) -> list[int]:
    """Indices of the best row (lowest `metric`) at each distinct compute, by compute."""
    best: dict[float, int] = {}
    for i, row in enumerate(rows):
        c = row["compute_flops"]
        if c not in best or row[metric] < rows[best[c]][metric]:
            best[c] = i
    return [best[c] for c in sorted(best)]


def fit_rows(rows: list[dict[str, Any]], irreducible: bool = False) -> tuple[PowerLaw | None, str]:
    """(the law, or None; a note saying why not or what it fitted). Marks each row's `on_frontier`."""
    on = frontier(rows)
    for i, row in enumerate(rows):
        row["on_frontier"] = i in on
    need = 4 if irreducible else 3  # two points always lie on a line: r2 = 1 says nothing
    if len(on) < need:
        return None, (f"no fit: {len(on)} distinct compute value(s), a power law needs {need}; "
                      "add sizes to the ladder (e.g. --grid model.n_embd=32,64,128)")
    law = fit_power_law([rows[i]["compute_flops"] for i in on], [rows[i][FIT_METRIC] for i in on], irreducible)
    return law, f"{FIT_METRIC} vs compute over the best point at each of {len(on)} compute values"
