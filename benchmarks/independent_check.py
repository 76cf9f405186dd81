"""An independent re-measurement of one TopK SAE's held-out FVU and delta loss, deliberately not
through `sae_dist.evaluate`: the SAE's math is written here from its safetensors, the splice is
a plain HF forward hook on the decoder layer's output (residual-stream SAEs only), the
cross-entropy is `F.cross_entropy`, and the outlier rule is a per-batch one (norm <= factor x
the batch's median norm). By default it scores the held-out chats *after* the ones a demo run's
end-of-run evaluation used (that one takes the first `--skip` batches of 16 sequences).

    python benchmarks/independent_check.py --suite runs/demo/suite --layer 12 --skip 2 \\
        --tokens 8000 --threads 2

Prints one JSON line: tokens, fvu, ce_clean, ce_spliced, delta_loss, ce_positions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sae_dist.config import DataConfig
from sae_dist.data import TokenStream
from sae_dist.models import load_model
from sae_dist.suite import model_config_for


def topk_reconstruction(weights: dict[str, torch.Tensor], k: int):
    """x [n, d_in] -> x_hat [n, d_in] of a folded TopK SAE: relu of the k largest of
    (x - b_dec) W_enc + b_enc, decoded by W_dec and b_dec."""

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
        values, indices = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        return z @ weights["W_dec"] + weights["b_dec"]

    return reconstruct


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", type=Path, required=True)
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="held-out batches to skip")
    p.add_argument("--tokens", type=int, default=8000)
    p.add_argument("--outlier-factor", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.suite / f"layers.{args.layer}.resid"
    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg["architecture"] != "topk":
        raise SystemExit(f"{folder}: architecture {cfg['architecture']!r}; this check reads TopK")
    reconstruct = topk_reconstruction(load_file(str(folder / "sae_weights.safetensors")), cfg["k"])
    model, tokenizer = load_model(model_config_for("smollm2-135m-instruct"))
    state: dict = {"splice": None}

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if state["splice"] is None:
            state["acts"] = hidden.detach()
            return None
        hidden = hidden.clone()
        hidden[state["splice"]] = reconstruct(hidden[state["splice"]].float()).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    model.model.layers[args.layer].register_forward_hook(hook)
    sse = sum_sq = 0.0
    sum_x, n, ce_clean, ce_spliced, n_ce = None, 0, 0.0, 0.0, 0
    stream = TokenStream(DataConfig(), tokenizer, "eval", seed=0)
    for i, batch in enumerate(stream.batches(16)):
        if i < args.skip:
            continue
        ids, mask = batch.input_ids, batch.train_mask
        state["splice"] = None
        with torch.no_grad():
            clean = model(input_ids=ids, use_cache=False).logits.float()
        acts = state["acts"].float()
        norms = acts.norm(dim=-1)
        keep = mask & (norms <= args.outlier_factor * norms[mask].median())
        x = acts[keep].double()
        sse += float((x - reconstruct(acts[keep]).double()).pow(2).sum())
        sum_x = x.sum(0) if sum_x is None else sum_x + x.sum(0)
        sum_sq += float(x.pow(2).sum())
        n += x.shape[0]
        state["splice"] = keep
        with torch.no_grad():
            spliced = model(input_ids=ids, use_cache=False).logits.float()
        at, targets = mask[:, :-1], ids[:, 1:][mask[:, :-1]]
        ce_clean += float(F.cross_entropy(clean[:, :-1][at], targets, reduction="sum"))
        ce_spliced += float(F.cross_entropy(spliced[:, :-1][at], targets, reduction="sum"))
        n_ce += int(at.sum())
        if n >= args.tokens:
            break
    variance = sum_sq - float(sum_x.pow(2).sum()) / n
    print(
        json.dumps(
            {
                "tokens": n,
                "fvu": sse / variance,
                "ce_clean": ce_clean / n_ce,
                "ce_spliced": ce_spliced / n_ce,
                "delta_loss": (ce_spliced - ce_clean) / n_ce,
                "ce_positions": n_ce,
            }
        )
    )


if __name__ == "__main__":
    main()
