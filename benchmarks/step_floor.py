"""The floor under one TopK training step on this machine: the parts no implementation of an
exact TopK SAE can skip, timed alone, as an upper bound on training tokens/s.

Every exact TopK step computes all pre-activations (one dense [B, d_in] x [d_in, d_sae] matmul:
2 B d_in d_sae FLOPs) and selects each row's k largest; everything else (sparse decode, the
sparse encoder gradient, Adam, renormalisation) comes on top. `sae_step.py` measures the real
step; this script says how far from the floor it is and whether a speed target is reachable.

    python benchmarks/step_floor.py --d-in 576 --d-sae 9216 --k 32 --batch 4096 --threads 2 \
        [--dtypes fp32 bf16]

Prints one JSON line per dtype: matmul_ms, topk_ms (median of --repeats), gflops (of the
matmul), tokens_per_s_matmul (batch / matmul time) and tokens_per_s_floor (batch / (matmul +
topk)). The matmul is the one `SparseAutoencoder.pre_acts` runs (addmm with W_enc [d_in,
d_sae]); without native bf16 (AVX2) a bf16 run of it takes minutes.
"""

from __future__ import annotations

import argparse
import json

import torch
from actsfile import median_seconds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def floor(
    d_in: int, d_sae: int, k: int, batch: int, dtype: torch.dtype, repeats: int
) -> dict[str, float]:
    """Times of the encoder matmul (with bias) and the row-wise top-k at these shapes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=gen).to(dtype)
    w_enc = torch.randn(d_in, d_sae, generator=gen).to(dtype)
    b_enc = torch.zeros(d_sae, dtype=dtype)
    pre = torch.addmm(b_enc, x, w_enc)  # also the matmul's warm-up
    matmul = median_seconds(lambda: torch.addmm(b_enc, x, w_enc), repeats)
    pre.topk(k, dim=1, sorted=False)  # warm-up
    topk = median_seconds(lambda: pre.topk(k, dim=1, sorted=False), repeats)
    return {
        "matmul_ms": matmul * 1e3,
        "topk_ms": topk * 1e3,
        "gflops": 2 * batch * d_in * d_sae / matmul / 1e9,
        "tokens_per_s_matmul": batch / matmul,
        "tokens_per_s_floor": batch / (matmul + topk),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.dtypes:
        result = floor(args.d_in, args.d_sae, args.k, args.batch, DTYPES[name], args.repeats)
        print(
            json.dumps(
                {
                    "dtype": name,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": args.threads,
                    **{k: round(v, 1) for k, v in result.items()},
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
