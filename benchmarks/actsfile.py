"""The activation-file protocol shared by `sae_step.py` and the comparison scripts
(`sparsify_step.py`, `saelens_step.py`), so that every tool trains on the same rows in the same
order and is scored the same way. Needs only torch and safetensors: it runs in each tool's own
environment.

File: a safetensors file holding a float32 [N, d_in] tensor under one key. The last
`HOLDOUT` rows are held out; training walks the other rows in one fixed random order (seed 0),
wrapping around as often as `--tokens` needs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

HOLDOUT = 20_000
"""Rows at the end of the file used only for the held-out metrics."""
WARMUP_STEPS = 3
"""Training steps excluded from `tokens_per_s` (first-call allocations, lazy initialisation)."""


def add_args(p: argparse.ArgumentParser) -> None:
    """The common interface: --data --key --arch --d-sae --k --batch --tokens --threads
    --dtype --lr."""
    p.add_argument("--data", help="safetensors file with a float32 [N, d_in] tensor")
    p.add_argument("--key", default="acts", help="tensor name in --data")
    p.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "jumprelu", "relu"])
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32, help="k (TopK family); target L0 (JumpReLU)")
    p.add_argument("--batch", type=int, default=4096, help="training batch in tokens")
    p.add_argument("--tokens", type=int, default=400_000, help="training tokens")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="SAE compute: fp32, or bf16 autocast with fp32 master weights",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate (default 2e-4 / sqrt(d_sae / 16384), Gao et al.)",
    )


def topk_setup(
    description: str, tool: str
) -> tuple[argparse.Namespace, torch.Tensor, torch.Tensor]:
    """What every comparison script of another tool does first: parse the common interface
    (TopK only), set threads and seed 0, load the file, fill in the default learning rate.
    Returns (args, training rows, held-out rows)."""
    p = argparse.ArgumentParser(description=description)
    add_args(p)
    args = p.parse_args()
    if args.arch != "topk":
        raise SystemExit(f"the {tool} comparison covers TopK only (--arch topk)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_train, x_held = load(args.data, args.key)
    args.lr = args.lr or default_lr(args.d_sae)
    return args, x_train, x_held


def default_lr(d_sae: int) -> float:
    """2e-4 / sqrt(d_sae / 2^14): the learning rate every tool gets unless --lr is given."""
    return 2e-4 / (d_sae / 2**14) ** 0.5


def load(path: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows [N - HOLDOUT, d_in], held-out rows [HOLDOUT, d_in]), float32."""
    tensors = load_file(path)
    if key not in tensors:
        raise SystemExit(f"{path} has no tensor {key!r}; it has {sorted(tensors)}")
    x = tensors[key]
    if x.ndim != 2 or x.dtype != torch.float32 or x.shape[0] <= HOLDOUT:
        raise SystemExit(
            f"{path}:{key} must be float32 [N > {HOLDOUT}, d_in]; got {x.dtype} {list(x.shape)}"
        )
    return x[:-HOLDOUT], x[-HOLDOUT:]


def batches(x: torch.Tensor, batch: int, tokens: int) -> Iterator[torch.Tensor]:
    """tokens // batch contiguous [batch, d_in] batches of the rows of x in a fixed random
    order (seed 0; a new permutation each pass over x)."""
    gen = torch.Generator().manual_seed(0)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(tokens // batch):
        if order.numel() < batch:
            order = torch.cat([order, torch.randperm(x.shape[0], generator=gen)])
        idx, order = order[:batch], order[batch:]
        yield x[idx]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls of fn() (no warm-up call)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class StepTimer:
    """Wall-clock seconds of the training steps after the first `WARMUP_STEPS`."""

    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0
    _start: float = field(default=0.0, repr=False)

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, n_tokens: int) -> None:
        if self.steps >= WARMUP_STEPS:
            self.seconds += time.perf_counter() - self._start
            self.tokens += n_tokens
        self.steps += 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


@torch.no_grad()
def held_out_metrics(
    encode_decode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    chunk: int = 4096,
) -> dict[str, float]:
    """fvu, l0 and dead_frac on held-out rows x [N, d_in] (raw activations).

    `encode_decode(x [n, d_in]) -> (x_hat [n, d_in], latents [n, d_sae] dense)` in inference
    mode. FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (float64 sums); l0 = mean number
    of latents > 0 per row; dead_frac = fraction of latents > 0 on no held-out row."""
    err = 0.0
    active = None
    l0 = 0.0
    for rows in x.split(chunk):
        x_hat, z = encode_decode(rows)
        err += float((rows.double() - x_hat.double()).pow(2).sum())
        fired = z > 0
        l0 += float(fired.sum())
        active = fired.any(0) if active is None else active | fired.any(0)
    total = float((x.double() - x.double().mean(0)).pow(2).sum())
    return {"fvu": err / total, "l0": l0 / x.shape[0], "dead_frac": float((~active).float().mean())}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(
    tool: str,
    args: argparse.Namespace,
    timer: StepTimer,
    metrics: dict[str, float],
    **extra: object,
) -> None:
    """Print the one JSON line every script prints."""
    out = {
        "tool": tool,
        "arch": args.arch,
        "dtype": args.dtype,
        "d_sae": args.d_sae,
        "k": args.k,
        "batch": args.batch,
        "tokens": args.tokens,
        "threads": args.threads,
        "lr": args.lr,
        "tokens_per_s": round(timer.tokens_per_s, 1),
        "timed_steps": timer.steps - min(timer.steps, WARMUP_STEPS),
        **{k: round(v, 5) for k, v in metrics.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **extra,
    }
    print(json.dumps(out), flush=True)
