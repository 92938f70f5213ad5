"""A profile's report: head scores per layer and KV head, the labels at a streaming fraction, the
settings, and the SampleAttention sweep's table when the profile has one."""

from __future__ import annotations

import json
from pathlib import Path

from ..profile import Profile
from .sweep import sweep_summary


def report_text(profile: Profile, streaming_fraction: float | None = None) -> str:
    fraction = profile.streaming_fraction if streaming_fraction is None else streaming_fraction
    labels = profile.streaming_heads(fraction)
    covered = list(profile.layers)
    lines = [
        profile.describe(),
        "covers: every layer" if len(covered) == profile.num_layers else
        f"covers: the full-attention layers {covered} (the model's window layers keep their native window)",
        f"streaming heads at fraction {fraction}: {int(labels.sum())} of {profile.head_score.numel()}; per "
        f"{'layer' if len(covered) == profile.num_layers else 'covered layer'} {labels[covered].sum(-1).tolist()}",
        f"prefill: sink {profile.sink_size}, local {profile.local_size}; decode: token budget {profile.token_budget}, "
        f"pages {profile.page_size}/{profile.logical_page_size}, reuse {profile.reuse_interval}, "
        f"decode window {profile.decode_local_size}",
        f"SampleAttention: alpha {profile.alpha}, rw {profile.rw}, r_row {profile.r_row}, "
        f"dense below {profile.dense_below} tokens",
        f"calibration: {profile.calibration or '-'}",
        f"made by: {profile.command or '-'} ({profile.created or 'undated'})",
    ]
    if profile.sweep:
        lines += ["SampleAttention sweep:", sweep_summary(json.loads(profile.sweep))]
    choice = json.loads(profile.fraction_choice) if profile.fraction_choice else None
    if choice is None:
        lines.append("default fraction: not checked on held-out text (profiler option --choose-fraction)")
    else:
        lines.append(f"default fraction chosen on {choice.get('choosing_text', 'held-out text')}: "
                     f"{choice['fraction']} ({choice['rule']})")
        lines += [f"  fraction {r['fraction']:.2f}: lost {r['lost']} of {r['dense_correct']} dense-correct cells"
                  + (f", text KL {r['text_kl']:.4f}" if "text_kl" in r else "") for r in choice["rows"]]
    return "\n".join(lines)


def save_report(profile: Profile, path: str | Path, streaming_fraction: float | None = None) -> Path:
    """Write the report as a PNG: a heatmap of head scores with streaming heads marked, and the text."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the profile report draws with matplotlib: pip install matplotlib") from None
    fraction = profile.streaming_fraction if streaming_fraction is None else streaming_fraction
    labels = profile.streaming_heads(fraction)[list(profile.layers)]  # rows of the covered layers, as the scores
    scores = profile.head_score.numpy()
    layers, heads = scores.shape
    text = report_text(profile, fraction)
    from matplotlib.ticker import MaxNLocator

    fig, (ax, side) = plt.subplots(1, 2, figsize=(11.5, max(5.0, 0.22 * layers + 1.8)),
                                   gridspec_kw={"width_ratios": [max(3, heads), 8]})
    image = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ys, xs = labels.nonzero(as_tuple=True)
    ax.scatter(xs.numpy(), ys.numpy(), marker="x", color="white", s=18, linewidths=1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer" if len(profile.layers) == profile.num_layers else "covered layer (index among them)")
    ax.set_title(f"{profile.model_name or profile.model_type}: head scores\n(x = streaming at fraction {fraction})",
                 fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.08, pad=0.04, label="score (1 = needs the full context)")
    side.axis("off")
    side.text(0.0, 1.0, "\n".join(_wrap(line) for line in text.splitlines()), fontsize=6.5, family="monospace",
              va="top", transform=side.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wrap(line: str, width: int = 110) -> str:
    return "\n    ".join(line[i : i + width] for i in range(0, max(len(line), 1), width))
