"""SAELens (`sae-lens`) on an activation file, with the interface and JSON line of
`sae_step.py` (TopK only). Runs in its own environment:

    /work/envs/saelens/bin/python benchmarks/saelens_step.py --data ACTS.safetensors \\
        --key acts --d-sae 9216 --k 32 --batch 4096 --tokens 400000 --threads 2

The training step is SAELens's own `SAETrainer.step` (called per batch as `SAETrainer.fit`
does, without W&B or checkpoints) on a `TopKTrainingSAE` with SAELens's defaults otherwise
(decoder init norm 0.1, activations rescaled by decoder norm, dense latents, gradient clipping
at 1, AuxK coefficient 1). Same schedule as sae_dist: Adam at --lr, linear warm-up over the
first 5 % of steps, constant, linear decay to zero over the last 20 %. Input scaling
`expected_average_only_in` (sqrt(d_in) / mean norm), estimated here on the first batch as
sae_dist does (SAELens's `fit` would draw 1000 batches for it) and folded into the weights at
the end, as `fit` does. `--dtype bf16`: SAETrainer's bf16 autocast.
"""

from __future__ import annotations

import actsfile
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer


def main() -> None:
    args, x_train, x_held = actsfile.topk_setup(__doc__.split("\n\n")[0], "SAELens")
    d_in, n_steps = x_train.shape[1], args.tokens // args.batch
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=args.d_sae,
            k=args.k,
            dtype="float32",
            device="cpu",
            normalize_activations="expected_average_only_in",
        )
    )
    cfg = SAETrainerConfig(
        total_training_samples=n_steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr / 10,  # lr_end: cosine schedules only, unused here
        lr_warm_up_steps=max(1, round(0.05 * n_steps)),
        lr_decay_steps=round(0.2 * n_steps),
        device="cpu",
        autocast=args.dtype == "bf16",
    )
    batches = actsfile.batches(x_train, args.batch, args.tokens)
    trainer = SAETrainer(cfg, sae, data_provider=batches)
    timer = actsfile.StepTimer()
    for step, batch in enumerate(batches):
        if step == 0:
            trainer.activation_scaler.scaling_factor = d_in**0.5 / float(batch.norm(dim=1).mean())
        timer.start()
        trainer.maybe_reset_sparsity()
        out = trainer.step(batch)
        trainer.n_training_steps += 1
        timer.stop(batch.shape[0])
    sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
    sae.eval()

    def encode_decode(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = sae.encode(rows)
        return sae.decode(feats), feats

    metrics = actsfile.held_out_metrics(encode_decode, x_held)
    actsfile.report("saelens", args, timer, metrics, train_loss=float(out.loss.detach()))


if __name__ == "__main__":
    main()
