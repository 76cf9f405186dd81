"""Human-readable outputs of a run: the per-hookpoint table and the training curves."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_COLUMNS = ("fvu", "l0", "dead_frac", "cosine", "tokens")


def markdown_table(results: dict[str, dict[str, float]],
                   columns: tuple[str, ...] = REPORT_COLUMNS) -> str:
    """One row per hookpoint, one column per metric."""
    lines = ["| hookpoint | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for hp, res in results.items():
        cells = [f"{res[c]:.4g}" if isinstance(res[c], float) else str(res[c]) for c in columns]
        lines.append(f"| {hp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_training_curves(metrics_jsonl: Path, png: Path, metric: str = "fvu") -> Path:
    """Plot `<hookpoint>/<metric>` against training tokens, one line per hookpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line]
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.endswith(f"/{metric}"):
                series.setdefault(key.rsplit("/", 1)[0], []).append((row["step"], value))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for hp, points in sorted(series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=hp, linestyle="-" if hp.endswith("resid") else "--")
    ax.set(xlabel="training tokens per SAE", ylabel=f"training-batch {metric}", yscale="log",
           title=f"{metric} during training")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
