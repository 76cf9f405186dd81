"""An independent re-measurement of one residual SAE's held-out FVU and delta loss, deliberately not
through `sae_dist.evaluate`: the SAE's math is written here from its safetensors, the splice is
a plain HF forward hook on the decoder layer's output (residual-stream SAEs only), the
cross-entropy is `F.cross_entropy`, and the outlier rule is a per-batch one (norm <= factor x
the batch's median norm). Data (`--data`): `tail`, chats from the end of the ShareGPT file read
here (ShareGPT roles mapped by hand, rendered with the tokenizer's chat template, special tokens
left out, packed into rows of 256 with BOS), in file order from `--first-record` (the demo
reserves the file's last 5%, records 16,787 on, so by default these are chats no part of the
demo read); or `heldout`, the demo's held-out split after the batches its end-of-run evaluation
scored (`--skip`).

    python benchmarks/independent_check.py --suite runs/demo/suite --layer 12 --data tail \\
        --tokens 20000 --threads 2

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
from sae_dist.corpus import LocalCorpus
from sae_dist.data import TokenStream, local_path
from sae_dist.models import load_model
from sae_dist.suite import model_config_for

ROLES = {"human": "user", "gpt": "assistant"}
ROW = 256


def tail_rows(tokenizer, first_record: int):
    """(input_ids [16, 256], mask [16, 256]) batches of the ShareGPT chats from `first_record`
    on in file order: human/gpt turns only, chat template, BOS per row, specials masked."""
    corpus = LocalCorpus(local_path(DataConfig()))
    specials = set(tokenizer.all_special_ids)
    ids: list[int] = []
    with open(corpus.path, "rb") as f:
        for i in range(first_record, len(corpus)):
            record = corpus.record(i, f) or {}
            turns = [
                {"role": ROLES[t["from"]], "content": t["value"]}
                for t in record.get("conversations", [])
                if t.get("from") in ROLES and t.get("value", "").strip()
            ]
            if not turns:
                continue
            text = tokenizer.apply_chat_template(turns, tokenize=False)
            ids += tokenizer(text, add_special_tokens=False)["input_ids"][:4096]
            while len(ids) >= 16 * (ROW - 1):
                body = torch.tensor(ids[: 16 * (ROW - 1)]).view(16, ROW - 1)
                del ids[: 16 * (ROW - 1)]
                rows = torch.cat([torch.full((16, 1), tokenizer.bos_token_id), body], 1)
                mask = ~torch.isin(rows, torch.tensor(sorted(specials)))
                yield rows, mask


def reconstruction(weights: dict[str, torch.Tensor], cfg: dict):
    """x [n, d_in] -> x_hat [n, d_in] of a folded SAE from its SAELens cfg.json: pre =
    (x - b_dec) W_enc + b_enc; z = relu of pre's k largest (topk) or pre where pre > threshold
    (jumprelu, which BatchTopK SAEs export to); x_hat = z W_dec + b_dec."""

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
        if cfg["architecture"] == "topk":
            values, indices = pre.topk(cfg["k"], dim=-1)
            z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        else:
            z = pre * (pre > weights["threshold"])
        return z @ weights["W_dec"] + weights["b_dec"]

    return reconstruct


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", type=Path, required=True)
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--data", choices=("tail", "heldout"), default="tail")
    p.add_argument("--first-record", type=int, default=16_787, help="tail: first record read")
    p.add_argument("--skip", type=int, default=1, help="heldout: batches to skip")
    p.add_argument("--tokens", type=int, default=8000)
    p.add_argument("--outlier-factor", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.suite / f"layers.{args.layer}.resid"
    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg["architecture"] not in ("topk", "jumprelu"):
        raise SystemExit(
            f"{folder}: architecture {cfg['architecture']!r}; this check reads topk and jumprelu"
        )
    reconstruct = reconstruction(load_file(str(folder / "sae_weights.safetensors")), cfg)
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
    if args.data == "tail":
        batches = tail_rows(tokenizer, args.first_record)
    else:
        stream = TokenStream(DataConfig(reserved_frac=0.05), tokenizer, "eval")
        batches = ((b.input_ids, b.train_mask) for b in stream.batches(16))
    for i, (ids, mask) in enumerate(batches):
        if args.data == "heldout" and i < args.skip:
            continue
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
                "data": args.data,
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
