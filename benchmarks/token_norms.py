"""Activation-norm distributions per hookpoint, to choose the token policy's outlier factor
(DESIGN.md section 5; benchmarks/README.md, "Token norms").

    python benchmarks/token_norms.py [--model smollm2-135m-instruct] [--tokens 16384]

Streams the training split of the offline ShareGPT chats under `data.policy.positions=all`
(every non-special token of the rendered chat), captures every layer at resid, mlp and attn,
and prints a Markdown table per hookpoint: quantiles of ||x|| / median ||x|| (the median over
all sampled positions of that hookpoint) and the fraction of positions above 5, 10, 20, 50,
100x; then the fraction of positions above each factor at any hookpoint (the producer leaves a
position out at all hookpoints if it is an outlier at one) and the commonest outlier tokens.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from tqdm.auto import tqdm

from sae_dist.config import DataConfig, SitesConfig, TokenPolicyConfig
from sae_dist.data import TokenStream
from sae_dist.hookpoints import capture, grid_hookpoints
from sae_dist.models import load_model
from sae_dist.suite import model_config_for

QUANTILES = (0.9, 0.99, 0.999)
FACTORS = (5, 10, 20, 50, 100)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct", help="a conf/model/ name")
    p.add_argument("--tokens", type=int, default=16384, help="positions in the mask, at least")
    p.add_argument("--seqs", type=int, default=8, help="sequences of 256 tokens per forward")
    args = p.parse_args()
    cfg = model_config_for(args.model)
    model, tok = load_model(cfg, "cpu")
    hps = grid_hookpoints(SitesConfig(layers=None, sites=["resid", "mlp", "attn"]), cfg.n_layers)
    stream = TokenStream(DataConfig(policy=TokenPolicyConfig("all", None)), tok, "train")
    norms: dict[str, list[torch.Tensor]] = {hp.name: [] for hp in hps}
    ids_seen: list[torch.Tensor] = []
    seen = 0
    with tqdm(total=args.tokens, unit="tok") as bar:
        for batch in stream.batches(args.seqs):
            acts = capture(model, hps, batch.input_ids, stop_early=True)
            for hp in hps:
                norms[hp.name].append(acts[hp][batch.train_mask].float().norm(dim=1))
            ids_seen.append(batch.input_ids[batch.train_mask])
            seen += int(batch.train_mask.sum())
            bar.update(int(batch.train_mask.sum()))
            if seen >= args.tokens:
                break
    ids = torch.cat(ids_seen)
    ratios = {name: torch.cat(n) / torch.cat(n).median() for name, n in norms.items()}
    print(
        f"{args.model} ({cfg.dtype}), {seen} positions (positions=all), "
        f"ratio = ||x|| / median ||x|| per hookpoint\n"
    )
    print(
        "| hookpoint | median ||x|| | "
        + " | ".join(f"q{q:g}" for q in QUANTILES)
        + " | max | "
        + " | ".join(f">{f}x" for f in FACTORS)
        + " |"
    )
    print("|---|" + "---:|" * (2 + len(QUANTILES) + len(FACTORS)))
    for name, r in ratios.items():
        med = float(torch.cat(norms[name]).median())
        qs = torch.quantile(r.double(), torch.tensor(QUANTILES, dtype=torch.float64))
        print(
            f"| {name} | {med:.3g} | "
            + " | ".join(f"{float(q):.2f}" for q in qs)
            + f" | {float(r.max()):.1f} | "
            + " | ".join(f"{float((r > f).double().mean()):.2%}" for f in FACTORS)
            + " |"
        )
    stacked = torch.stack(list(ratios.values()))
    for site in ("resid", "mlp", "attn", None):
        rows = [i for i, n in enumerate(ratios) if site is None or n.endswith(site)]
        top = stacked[rows].amax(0)
        print(
            f"\nat any {site or 'hookpoint'}: "
            + ", ".join(f">{f}x {float((top > f).double().mean()):.2%}" for f in FACTORS)
        )
    top = stacked.amax(0)
    for f in (10, 50):
        common = Counter(ids[top > f].tolist()).most_common(8)
        print(
            f"\ncommonest tokens above {f}x at any hookpoint: "
            + ", ".join(f"{tok.decode([i])!r} x{n}" for i, n in common)
        )


if __name__ == "__main__":
    main()
