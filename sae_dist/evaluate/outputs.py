"""Human-readable outputs: the per-hookpoint table and training curves of a run, and the outputs
of a suite evaluation (per-SAE JSON, layer x site tables as Markdown and CSV, plots)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from sae_dist.evaluate.evaluator import scalar_metrics
from sae_dist.evaluate.probing import probe_columns
from sae_dist.hookpoints import SITES, Hookpoint

REPORT_COLUMNS = ("fvu", "l0", "dead_frac", "cosine", "tokens")
RECON_METRICS = (
    "fvu",
    "explained_variance",
    "mse",
    "cosine",
    "l0",
    "dead_frac",
    "dense_frac",
    "dense_l0",
)
MODEL_METRICS = (
    "ce_clean",
    "ce_spliced",
    "ce_zero",
    "delta_loss",
    "delta_loss_se",
    "loss_recovered",
    "kl",
)
EVAL_METRICS = RECON_METRICS + MODEL_METRICS
"""The metric names of DESIGN.md section 8 (and delta_loss_se), the keys of every per-SAE JSON."""
EVAL_COLUMNS = (
    "fvu",
    "fvu_ci",
    "l0",
    "dead_frac",
    "cosine",
    "delta_loss",
    "delta_loss_ci",
    "loss_recovered",
    "kl",
    "docs",
    "tokens",
)
"""Columns of the end-of-training report table."""
ALL_TOKEN_COLUMNS = ("fvu_all", "delta_loss_all", "kl_all", "tokens_all")
"""All-token figures (eval.all_tokens) shown in the suite table when present."""
SPREAD_COLUMNS = ("fvu_ci", "l0_ci", "delta_loss_ci", "docs")
"""Bootstrap intervals over documents and the document count (sae_dist.evaluate.spread)."""
PIVOT_METRICS = ("fvu", "l0", "delta_loss", "loss_recovered", "kl")
"""Metrics shown as layer x site tables in the suite report."""


def scalar_columns(columns: tuple[str, ...]) -> tuple[str, ...]:
    """`columns` with each interval `<m>_ci` as its two scalars `<m>_ci_low`, `<m>_ci_high` (the
    keys `scalar_metrics` gives)."""
    return tuple(
        part for c in columns for part in ((f"{c}_low", f"{c}_high") if c.endswith("_ci") else (c,))
    )


def _cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits, an interval [low, high] to 3."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(
    results: dict[str, dict[str, Any]], columns: tuple[str, ...] = REPORT_COLUMNS
) -> str:
    """One row per hookpoint, one column per metric (missing or None values show as –)."""
    lines = ["| hookpoint | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for hp, res in results.items():
        lines.append(f"| {hp} | " + " | ".join(_cell(res.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def plot_training_curves(metrics_jsonl: Path, png: Path, metric: str = "fvu") -> Path:
    """Plot `<hookpoint>/<metric>` against training tokens, one line per hookpoint."""
    plt = pyplot()
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
    ax.set(
        xlabel="training tokens per SAE",
        ylabel=f"training-batch {metric}",
        yscale="log",
        title=f"{metric} during training",
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib  # on first use: matplotlib adds about a second to start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------- suite evaluation


def _layer_site(name: str) -> tuple[int, str]:
    hp = Hookpoint.parse(name)
    return hp.layer, hp.site


def _sorted(results: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Results ordered by layer, then site in SITES order."""

    def key(item):
        layer, site = _layer_site(item[0])
        return layer, SITES.index(site) if site in SITES else len(SITES)

    return sorted(results.items(), key=key)


def pivot_table(results: dict[str, dict[str, Any]], metric: str) -> str:
    """Markdown table of one metric: one row per layer, one column per site."""
    cells = {_layer_site(hp): res.get(metric) for hp, res in results.items()}
    layers = sorted({layer for layer, _ in cells})
    sites = [s for s in SITES if any(site == s for _, site in cells)]
    lines = [f"| {metric} | " + " | ".join(sites) + " |", "|---:|" + "---:|" * len(sites)]
    for layer in layers:
        lines.append(
            f"| layer {layer} | "
            + " | ".join(_cell(cells[(layer, s)]) if (layer, s) in cells else "" for s in sites)
            + " |"
        )
    return "\n".join(lines)


def slices_tables(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: per SAE with `slices`, the metrics on each region of the evaluated documents
    (first and last document id, documents, tokens); empty without slices."""
    parts = []
    for hp, res in _sorted(results):
        rows = res.get("slices")
        if not rows:
            continue
        columns = [c for c in rows[0] if c not in ("first_doc", "last_doc")]
        lines = [
            f"### {hp}: by region of the corpus",
            "",
            "| documents | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for r in rows:
            cells = " | ".join(_cell(r[c]) for c in columns)
            lines.append(f"| {r['first_doc']}-{r['last_doc']} | {cells} |")
        parts.append("\n".join(lines))
    return "\n\n" + "\n\n".join(parts) + "\n" if parts else ""


def write_eval_outputs(
    results: dict[str, dict[str, Any]],
    out_dir: Path,
    context: dict[str, Any],
    sae_info: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write `saes/<hookpoint>.json` (metrics + context: config, model, data, token counts),
    `suite_table.md`, `suite_table.csv` and the plots; returns their paths
    ({"jsons", "table_md", "table_csv", "plots"})."""
    out_dir = Path(out_dir)
    (out_dir / "saes").mkdir(parents=True, exist_ok=True)
    jsons = []
    for hp, res in _sorted(results):
        layer, site = _layer_site(hp)
        doc = {
            "hookpoint": hp,
            "layer": layer,
            "site": site,
            **{m: res.get(m) for m in EVAL_METRICS},
            **{k: v for k, v in res.items() if k not in EVAL_METRICS},
            "sae": (sae_info or {}).get(hp),
            **context,
        }
        path = out_dir / "saes" / f"{hp}.json"
        path.write_text(json.dumps(doc, indent=2))
        jsons.append(path)
    columns = [m for m in EVAL_METRICS if any(r.get(m) is not None for r in results.values())]
    columns += [
        c
        for c in (*SPREAD_COLUMNS, "ce_mean", "tokens", "ce_tokens", "excluded", *ALL_TOKEN_COLUMNS)
        if any(c in r for r in results.values())
    ]
    columns += probe_columns(results)
    table_csv = out_dir / "suite_table.csv"
    with open(table_csv, "w", newline="") as f:
        writer = csv.writer(f)
        flat_columns = scalar_columns(tuple(columns))
        writer.writerow(["hookpoint", "layer", "site", *flat_columns])
        for hp, res in _sorted(results):
            flat = scalar_metrics(res)
            writer.writerow([hp, *_layer_site(hp), *(flat.get(c) for c in flat_columns)])
    pivots = "\n\n".join(
        pivot_table(results, m)
        for m in PIVOT_METRICS
        if any(r.get(m) is not None for r in results.values())
    )
    table_md = out_dir / "suite_table.md"
    table_md.write_text(
        f"# Suite evaluation: {context.get('suite', '')}\n\n"
        f"Model `{context.get('model', {}).get('name', '?')}`, {context.get('split', 'eval')} "
        f"split of `{context.get('data', {}).get('source', '?')}`, "
        f"{_cell(next(iter(results.values())).get('tokens'))} tokens; token policy: "
        f"{context.get('token_policy', '?')} (`excluded`: positions left out and unspliced; "
        f"`*_all`: every position of the position set; `*_ci`: 95% bootstrap intervals over "
        f"the `docs` documents).\n\n"
        f"{markdown_table(dict(_sorted(results)), tuple(columns))}\n\n{pivots}\n"
        f"{slices_tables(results)}"
    )
    plots = [
        plot_metrics_by_layer(results, out_dir / "metrics_by_layer.png"),
        plot_tradeoff(results, out_dir / "l0_tradeoff.png"),
    ]
    if any(r.get("latent_freq_hist") for r in results.values()):
        plots.append(plot_latent_frequency(results, out_dir / "latent_frequency.png"))
    return {"jsons": jsons, "table_md": table_md, "table_csv": table_csv, "plots": plots}


def _auto_log(ax, values: list[float]) -> None:
    """Log y-axis when all values are positive and span more than 1.5 decades."""
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")


def _by_site(
    results: dict[str, dict[str, Any]], metric: str
) -> dict[str, tuple[list[int], list[float]]]:
    """{site: (layers, values)} for the SAEs that have `metric`."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for hp, res in _sorted(results):
        if res.get(metric) is None:
            continue
        layer, site = _layer_site(hp)
        out.setdefault(site, ([], []))
        out[site][0].append(layer)
        out[site][1].append(res[metric])
    return out


def plot_metrics_by_layer(results: dict[str, dict[str, Any]], png: Path) -> Path:
    """One panel per metric of DESIGN.md section 8: the metric by layer, one line per site."""
    plt = pyplot()
    metrics = [m for m in EVAL_METRICS if any(r.get(m) is not None for r in results.values())]
    ncols = 4
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        series = _by_site(results, metric)
        for site, (layers, values) in series.items():
            ax.plot(layers, values, marker="o", label=site)
        ax.set(title=metric, xlabel="layer")
        _auto_log(ax, [v for _, values in series.values() for v in values])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_tradeoff(results: dict[str, dict[str, Any]], png: Path) -> Path:
    """The sparsity/fidelity trade-off: L0 against FVU and against delta loss, one marker per
    site, each point labelled with its layer."""
    plt = pyplot()
    panels = [
        m for m in ("fvu", "delta_loss") if any(r.get(m) is not None for r in results.values())
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, metric in zip(axes.flat, panels):
        all_y: list[float] = []
        for marker, site in zip("osD^", SITES):
            pts = [
                (r["l0"], r[metric], _layer_site(hp)[0])
                for hp, r in results.items()
                if _layer_site(hp)[1] == site
                and r.get("l0") is not None
                and r.get(metric) is not None
            ]
            if not pts:
                continue
            xs, ys, layers = zip(*pts)
            ax.scatter(xs, ys, marker=marker, label=site)
            all_y.extend(ys)
            for x, y, layer in pts:
                ax.annotate(
                    str(layer), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        ax.set(xlabel="L0 (active latents per token)", ylabel=metric, title=f"L0 vs {metric}")
        _auto_log(ax, all_y)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_latent_frequency(results: dict[str, dict[str, Any]], png: Path) -> Path:
    """Latent-frequency histograms (fraction of latents per log10-frequency bin), one panel per
    site, one line per layer; the dead fraction is in the legend."""
    plt = pyplot()
    sites = [s for s in SITES if any(_layer_site(hp)[1] == s for hp in results)]
    fig, axes = plt.subplots(1, len(sites), figsize=(5 * len(sites), 3.8), squeeze=False)
    for ax, site in zip(axes.flat, sites):
        for hp, res in _sorted(results):
            hist = res.get("latent_freq_hist")
            if _layer_site(hp)[1] != site or not hist:
                continue
            edges, counts = hist["log10_freq_edges"], hist["counts"]
            total = sum(counts) + hist["dead"]
            centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            ax.plot(
                centers,
                [c / total for c in counts],
                marker=".",
                label=f"layer {_layer_site(hp)[0]} (dead {hist['dead'] / total:.1%})",
            )
        ax.set(
            title=f"{site}: latent frequency",
            xlabel="log10 fraction of tokens active",
            ylabel="fraction of latents",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
