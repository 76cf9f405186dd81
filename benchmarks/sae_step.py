"""SAE training speed, two modes.

Training from an activation file (`--data`): trains one SAE with sae_dist's own training step
(`SuiteTrainer.step`, the step of `python -m sae_dist.train`: input scaling, forward, backward,
gradient clipping, Adam, LR schedule, decoder renormalisation, dead-latent counters) and prints
one JSON line: tokens_per_s (training steps after the first 3), fvu / l0 / dead_frac on the
held-out last 20,000 rows, peak_rss_mb (`actsfile.py` has the protocol).

    python benchmarks/sae_step.py --data ACTS.safetensors --key acts --arch topk --d-sae 9216 \
        --k 32 --batch 4096 --tokens 400000 --threads 2 [--dtype fp32|bf16]

Step-timing table (no `--data`): one full TopK training step on random data, sparse kernels
against the dense reference path, one Markdown row per configuration (median after warm-up).

    python benchmarks/sae_step.py --header --autocast   # the table in benchmarks/README.md
    python benchmarks/sae_step.py --paths sparse --autocast --dead-frac 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import actsfile
import torch
from accelerate import Accelerator
from tqdm import tqdm

from sae_dist.config import SAEConfig, TrainConfig, TrainRunConfig, sae_config
from sae_dist.hookpoints import Hookpoint
from sae_dist.sae import SparseAutoencoder, TopKSAE
from sae_dist.train.suite_trainer import SuiteTrainer

HOOKPOINT = Hookpoint(12, "resid")
"""Name under which the trainer holds the SAE (only used for its seed)."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    actsfile.add_args(p)
    p.add_argument("--d-in", type=int, default=576, help="table mode: activation width")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--paths", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    p.add_argument("--autocast", action="store_true", help="also run under bf16 autocast")
    p.add_argument(
        "--dead-frac",
        type=float,
        default=0.0,
        help="fraction of latents marked dead (adds the AuxK pass)",
    )
    p.add_argument("--header", action="store_true", help="print the table header first")
    return p.parse_args()


def time_steps(
    sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, bf16: bool, warmup: int, steps: int
) -> float:
    """Median wall-clock seconds of one training step on batch x [B, d_in]."""
    sae.project_decoder_grads()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with ctx:
            out = sae(x, dead)
        opt.zero_grad(set_to_none=True)
        sum(out.losses.values()).backward()
        opt.step()
        sae.normalize_decoder()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def sae_config_of(args: argparse.Namespace) -> SAEConfig:
    """The SAE config of --arch, --d-sae and --k (JumpReLU: target L0 = k)."""
    if args.arch in ("topk", "batchtopk"):
        return sae_config(args.arch, d_sae=args.d_sae, k=args.k)
    if args.arch == "jumprelu":
        return sae_config(args.arch, d_sae=args.d_sae, target_l0=float(args.k))
    return sae_config(args.arch, d_sae=args.d_sae)


def train_from_file(args: argparse.Namespace) -> None:
    """Train one SAE on --data with `SuiteTrainer` and print the JSON line."""
    x_train, x_held = actsfile.load(args.data, args.key)
    args.lr = args.lr or actsfile.default_lr(args.d_sae)
    cfg = TrainRunConfig(
        sae=sae_config_of(args),
        train=TrainConfig(tokens=args.tokens, batch_size=args.batch, lr=args.lr, eval_tokens=0),
    )
    cfg.trainer.mixed_precision = "bf16" if args.dtype == "bf16" else "no"
    accelerator = Accelerator(mixed_precision=cfg.trainer.mixed_precision, cpu=True)
    trainer = SuiteTrainer([HOOKPOINT], cfg, x_train.shape[1], accelerator)
    timer = actsfile.StepTimer()
    stats = {}
    for batch in tqdm(
        actsfile.batches(x_train, args.batch, args.tokens),
        desc=args.arch,
        total=trainer.n_steps,
        unit="step",
    ):
        timer.start()
        stats = trainer.step({HOOKPOINT.name: batch})[HOOKPOINT.name]
        timer.stop(batch.shape[0])
    sae = trainer.folded_saes()[HOOKPOINT.name].eval()
    metrics = actsfile.held_out_metrics(lambda rows: decode_dense(sae, rows), x_held)
    actsfile.report(
        "sae_dist", args, timer, metrics, train_fvu=float(stats["fvu"]), train_l0=float(stats["l0"])
    )


def decode_dense(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, d_in] -> (x_hat [n, d_in], dense latents [n, d_sae]) in inference mode."""
    latents = sae.encode(x)
    return sae.decode(latents), latents.dense()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.data:
        train_from_file(args)
        return
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    dead = torch.rand(args.d_sae) < args.dead_frac
    if args.header:
        print("| path | encoder matmul | dead latents (AuxK) | median step (ms) | tokens/s |")
        print("|---|---|---|---|---|")
    for bf16 in [False, True] if args.autocast else [False]:
        for path in args.paths:
            cfg = sae_config(d_sae=args.d_sae, k=args.k)
            sae = TopKSAE(cfg, args.d_in, sparse=path == "sparse")
            sec = time_steps(sae, x, dead, bf16, args.warmup, args.steps)
            print(
                f"| {path} | {'bf16 autocast' if bf16 else 'fp32'} | {int(dead.sum())} "
                f"| {sec * 1e3:.0f} | {args.batch / sec:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
