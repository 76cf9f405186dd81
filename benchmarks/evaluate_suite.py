"""Time to evaluate a suite (reconstruction + model-level metrics) against one clean forward pass.

    .venv/bin/python benchmarks/evaluate_suite.py --suite runs/demo/suite --tokens 100000

For every held-out batch (at most 4096 positions) it times, back to back on that batch, so that
a load change on a shared machine hits every column alike:
- clean:  one plain HF forward pass (full logits) — the unit of cost (median of
          --clean-repeats runs, taken before and after the other columns);
- recon:  `evaluate_saes(model_level=False)`: every SAE's reconstruction metrics from one forward
          stopped after the last layer needed;
- full:   `evaluate_saes()`: reconstruction + ce_clean/ce_spliced/ce_zero/kl for every SAE
          (one clean pass, then per start layer the batched replays from that layer on);
- naive:  (first --naive-batches batches only) the plain scheme: per SAE one full spliced
          forward and one full zero-ablated forward with full logits, CE and KL.
Totals are sums over the batches; the ratios to `clean` are the figures to compare across
machines (the per-batch ratios and their median are printed too). Each batch's recon / full /
naive timings are the median of --repeats runs. The load average (`uptime`) is printed before
and after every batch: only batches run on an idle machine give meaningful ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from actsfile import median_seconds

from sae_dist.checkpoint import load_sae
from sae_dist.config import DataConfig
from sae_dist.data import TokenStream
from sae_dist.evaluate.evaluator import evaluate_saes, split_batches
from sae_dist.hookpoints import Hookpoint, splice
from sae_dist.models import load_model
from sae_dist.suite import discover_saes, model_config_for

OUTLIER_FACTOR = DataConfig().policy.outlier_factor
"""The default token policy's outlier filter (the one `python -m sae_dist.evaluate` applies)."""

CPU = torch.device("cpu")


@torch.no_grad()
def clean_forward(model, batch) -> None:
    model(batch.input_ids, use_cache=False)


@torch.no_grad()
def naive(model, saes, batch) -> None:
    """One clean forward, then per SAE a full forward with the reconstruction spliced at the
    masked positions and one with zeros, full logits, CE and KL at the CE positions."""
    sel = batch.train_mask[:, :-1]
    targets = batch.input_ids[:, 1:][sel]
    clean = model(batch.input_ids).logits[:, :-1][sel].float().log_softmax(-1)
    for hp, sae in saes.items():
        for kind in ("spliced", "zero"):

            def fn(act, sae=sae, kind=kind):
                out = act.clone()
                x = act[batch.train_mask].float()
                out[batch.train_mask] = (
                    sae(x).x_hat if kind == "spliced" else torch.zeros_like(x)
                ).to(act.dtype)
                return out

            with splice(model, {hp: fn}):
                lp = model(batch.input_ids).logits[:, :-1][sel].float().log_softmax(-1)
            F.nll_loss(lp, targets)
            (clean.exp() * (clean - lp)).sum(-1).mean()


def load_average() -> str:
    """The 1-minute load average (of the whole machine, this process included)."""
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="runs/demo/suite")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--batch-seqs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--clean-repeats", type=int, default=3)
    ap.add_argument("--naive-batches", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folders, model_name = discover_saes(Path(args.suite))
    mcfg = model_config_for(model_name)
    model, tokenizer = load_model(mcfg)
    saes = {Hookpoint.parse(n, mcfg.n_layers): load_sae(f)[0].eval() for n, f in folders.items()}
    batches = split_batches(
        list(
            TokenStream(DataConfig(), tokenizer, "eval").batches_until(args.tokens, args.batch_seqs)
        ),
        4096,
    )
    n_tok = sum(int(b.train_mask.sum()) for b in batches)
    lm_tok = sum(b.input_ids.numel() for b in batches)
    print(
        f"{len(saes)} SAEs, {mcfg.name} ({mcfg.dtype}), {len(batches)} batches, {lm_tok} LM "
        f"tokens ({n_tok} pass the mask), {torch.get_num_threads()} threads",
        flush=True,
    )
    clean_forward(model, batches[0])  # warm-up
    tot = dict.fromkeys(("clean", "recon", "full"), 0.0)
    per_batch = []
    for i, b in enumerate(batches):
        load_before = load_average()
        half = max(1, args.clean_repeats // 2)
        cleans = [median_seconds(lambda b=b: clean_forward(model, b), 1) for _ in range(half)]
        row = {
            kind: median_seconds(
                lambda b=b, kind=kind: evaluate_saes(
                    model, saes, [b], CPU, model_level=kind == "full", outlier_factor=OUTLIER_FACTOR
                ),
                args.repeats,
            )
            for kind in ("recon", "full")
        }
        if i < args.naive_batches:
            row["naive"] = median_seconds(lambda b=b: naive(model, saes, b), args.repeats)
        cleans += [
            median_seconds(lambda b=b: clean_forward(model, b), 1)
            for _ in range(max(1, args.clean_repeats - half))
        ]
        row = {"clean": statistics.median(cleans), **row}
        row["load"] = [load_before, load_average()]
        per_batch.append(row)
        for k in tot:
            tot[k] += row[k]
        print(
            f"batch {i + 1}/{len(batches)}: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in row.items() if k != "load")
            + f"; full / clean "
            f"{row['full'] / row['clean']:.1f}; load {row['load'][0]} -> {row['load'][1]}",
            flush=True,
        )
    few = per_batch[: args.naive_batches]
    naive_ratio = statistics.median(r["naive"] / r["clean"] for r in few) if few else None
    full_few = statistics.median(r["full"] / r["clean"] for r in few) if few else None
    ratios = [r["full"] / r["clean"] for r in per_batch]
    print(
        f"\nfull / clean per batch: median {statistics.median(ratios):.1f} (min "
        f"{min(ratios):.1f}, max {max(ratios):.1f})"
    )
    print(
        f"clean forward {tot['clean']:.1f} s ({lm_tok / tot['clean']:.0f} tok/s); "
        f"reconstruction only {tot['recon']:.1f} s = {tot['recon'] / tot['clean']:.2f} x "
        f"clean; full evaluation {tot['full']:.1f} s = {tot['full'] / tot['clean']:.2f} x clean"
    )
    if few:
        print(
            f"first {len(few)} batch(es): naive {naive_ratio:.1f} x clean vs replay scheme "
            f"{full_few:.1f} x clean ({naive_ratio / full_few:.2f}x faster)"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "suite": args.suite,
                    "model": mcfg.name,
                    "saes": len(saes),
                    "lm_tokens": lm_tok,
                    "masked_tokens": n_tok,
                    "threads": torch.get_num_threads(),
                    "totals_s": tot,
                    "naive_over_clean": naive_ratio,
                    "full_over_clean_same_batches": full_few,
                    "full_over_clean_median_batch": statistics.median(ratios),
                    "per_batch": per_batch,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
