"""Pictures of evaluation rows: depth x length heatmaps (dense | sparse) and perplexity charts.

Both functions take the rows the harness writes and return the matplotlib ``Figure`` (saved to ``path``
when given). They use matplotlib's object API (no pyplot state, no GUI backend needed).
"""

from __future__ import annotations

from pathlib import Path


def _figure(width: float, height: float, columns: int):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError('the evaluation pictures need matplotlib: pip install "sparse_attn_hf[examples]"') from None
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def retrieval_heatmap(rows: list[dict], path: str | Path | None = None, title: str = ""):
    """Depth (down) x length (across), mean ``dense_score`` and ``sparse_score`` per cell, side by side.

    Colour: retrieval score from 0 (red, wrong) to 1 (green, right); each cell prints its value."""
    import numpy as np

    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = _figure(2.5 + 2.2 * max(len(lengths), 2), 2.0 + 0.5 * max(len(depths), 2), 2)
    image = None
    for ax, kind in zip(axes, ("dense", "sparse")):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                cell = [r[f"{kind}_score"] for r in rows if r["depth"] == depth and r["length"] == length]
                if cell:
                    grid[i, j] = sum(cell) / len(cell)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length, tokens")
        if kind == "dense":
            ax.set_ylabel("needle depth")
        correct = sum(r[f"{kind}_correct"] for r in rows)
        ax.set_title(f"{kind}: {correct}/{len(rows)} correct")
    fig.colorbar(image, ax=list(axes), label="retrieval score")
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def perplexity_chart(rows: list[dict], path: str | Path | None = None, title: str = ""):
    """Per text length: dense and sparse perplexity (bars); top-1 agreement and mean KL (lines)."""
    rows = sorted(rows, key=lambda r: r["tokens"])
    labels = [str(r["tokens"]) for r in rows]
    x = range(len(rows))
    fig, (left, right) = _figure(10, 3.8, 2)
    for shift, kind in ((-0.2, "dense"), (0.2, "sparse")):
        bars = left.bar([i + shift for i in x], [r[f"{kind}_ppl"] for r in rows], 0.4, label=kind)
        left.bar_label(bars, fmt="%.2f", fontsize=8)
    left.set_xticks(list(x), labels)
    left.set_xlabel("text tokens")
    left.set_ylabel("perplexity")
    left.legend(fontsize=8)
    right.plot(list(x), [r["top1_agreement"] for r in rows], marker="o", color="tab:green", label="top-1 agreement")
    for i, r in zip(x, rows):
        right.annotate(f"{r['top1_agreement']:.3f} / KL {r['mean_kl']:.4f}", (i, r["top1_agreement"]),
                       textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    right.set_ylim(0, 1.05)
    right.set_xlim(-0.5, len(rows) - 0.5)
    right.set_ylabel("next-token top-1 agreement")
    right.set_xticks(list(x), labels)
    right.set_xlabel("text tokens")
    kl_axis = right.twinx()
    kl_axis.plot(list(x), [r["mean_kl"] for r in rows], marker="s", color="tab:red", label="mean KL")
    kl_axis.set_ylabel("mean KL(dense || sparse), nats")
    kl_axis.set_ylim(bottom=0)
    right.legend(handles=right.get_lines() + kl_axis.get_lines(), fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig
