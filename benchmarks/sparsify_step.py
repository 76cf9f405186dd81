"""EleutherAI sparsify (`eai-sparsify`) on an activation file, with the interface and JSON line
of `sae_step.py` (TopK only). Runs in its own environment:

    /work/envs/sparsify/bin/python benchmarks/sparsify_step.py --data ACTS.safetensors \\
        --key acts --d-sae 9216 --k 32 --batch 4096 --tokens 400000 --threads 2

sparsify's `Trainer.fit` trains on a model's hidden states, not on a file, so this script runs
the per-batch SAE work of `Trainer.fit` (sparsify 1.3.3, loss_fn=fvu, optimizer=adam) on the
file's batches: b_dec = mean of the first batch, decoder rows renormalised before each forward,
`SparseCoder.forward` (its fused TopK encoder and sparse decoder), loss = FVU (auxk_alpha 0,
sparsify's default), backward, removal of the decoder-parallel gradient, torch Adam, sparsify's
LR schedule (`get_linear_schedule_with_warmup`, warm-up over the same 5 % of steps as sae_dist,
then linear decay to zero), fired-latent bookkeeping. `--dtype bf16` runs the forward under CPU
bf16 autocast (sparsify's own autocast is CUDA-only). No input normalisation (sparsify has
none; FVU does not depend on the scale).
"""

from __future__ import annotations

import contextlib

import actsfile
import torch
from sparsify import SparseCoder, SparseCoderConfig
from transformers import get_linear_schedule_with_warmup


def main() -> None:
    args, x_train, x_held = actsfile.topk_setup(__doc__.split("\n\n")[0], "sparsify")
    sae = SparseCoder(
        x_train.shape[1],
        SparseCoderConfig(num_latents=args.d_sae, k=args.k),
        device="cpu",
        dtype=torch.float32,
    )
    n_steps = args.tokens // args.batch
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    sched = get_linear_schedule_with_warmup(opt, max(1, round(0.05 * n_steps)), n_steps)
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if args.dtype == "bf16"
        else contextlib.nullcontext()
    )
    since_fired = torch.zeros(args.d_sae, dtype=torch.long)
    timer = actsfile.StepTimer()
    for step, batch in enumerate(actsfile.batches(x_train, args.batch, args.tokens)):
        timer.start()
        if step == 0:
            sae.b_dec.data = batch.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        with ctx:
            out = sae(batch, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired += batch.shape[0]
            since_fired[out.latent_indices.flatten()] = 0
        timer.stop(batch.shape[0])
    sae.set_decoder_norm_to_unit_norm()

    def encode_decode(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts, indices, _ = sae.encode(rows)
        dense = torch.zeros(rows.shape[0], args.d_sae).scatter_(1, indices, acts.float())
        return sae.decode(acts, indices), dense

    metrics = actsfile.held_out_metrics(encode_decode, x_held)
    actsfile.report("sparsify", args, timer, metrics, train_fvu=float(out.fvu.detach()))


if __name__ == "__main__":
    main()
