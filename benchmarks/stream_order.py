"""Seconds to produce the demo's training token stream (200k train-mask tokens, rows of 256,
batches of 16) reading the embedded ShareGPT file in order and as a seeded sample (with the
demo's 5 % reserved tail), interleaved, three times each; the first sampled run includes
indexing the file.

    python benchmarks/stream_order.py
"""

from __future__ import annotations

import time

from sae_dist.config import DataConfig
from sae_dist.data import TokenStream
from sae_dist.models import load_model
from sae_dist.suite import model_config_for


def main() -> None:
    _, tokenizer = load_model(model_config_for("smollm2-135m-instruct"))
    for shuffle in (False, True) * 3:
        cfg = DataConfig(shuffle=shuffle, reserved_frac=0.05 if shuffle else 0.0)
        start = time.perf_counter()
        batches = TokenStream(cfg, tokenizer, "train").batches_until(200_000, 16)
        tokens = sum(int(b.train_mask.sum()) for b in batches)
        print(f"shuffle={shuffle} tokens={tokens} seconds={time.perf_counter() - start:.2f}")


if __name__ == "__main__":
    main()
