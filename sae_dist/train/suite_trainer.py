"""The SAE trainer of one process: its SAEs as one module with one optimizer, stepped in
lockstep (each step gives every SAE one batch), under accelerate: one process, DDP, or
DeepSpeed ZeRO (DESIGN.md sections 6 and 7).

Each process's loss already has the value of the global batch's loss (`BatchGroup.sum`) with
gradients into its own tokens only, so the backward pass runs on loss x world size and the
gradient averaging of DDP / ZeRO yields the global gradient.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from sae_dist.config import TrainRunConfig
from sae_dist.distributed import BatchGroup
from sae_dist.hookpoints import Hookpoint
from sae_dist.sae import SAEOutput, SparseAutoencoder, build_sae


def lr_factor(step: int, n_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warm-up over the first `warmup_frac` of steps, constant, then linear decay to zero
    over the last `decay_frac`."""
    warmup, decay = max(1, round(warmup_frac * n_steps)), round(decay_frac * n_steps)
    if step < warmup:
        return (step + 1) / warmup
    if decay and step >= n_steps - decay:
        return max(0.0, (n_steps - step) / decay)
    return 1.0


def seeded_sae(cfg: TrainRunConfig, name: str, d_in: int) -> SparseAutoencoder:
    """A freshly initialised SAE whose random weights depend on `train.seed` and the
    hookpoint's name only (not on which other SAEs the process builds). The CPU generator keeps
    32 bits of its seed, so both are mixed into 32 bits (seed 0: the name's CRC-32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((zlib.crc32(name.encode()) + cfg.train.seed * 0x9E3779B1) % 2**32)
        return build_sae(cfg.sae, d_in)


class SAESuite(nn.Module):
    """The SAEs of one process, by hookpoint name; `forward` runs each on its batch."""

    def __init__(self, saes: dict[str, SparseAutoencoder]):
        super().__init__()
        self.names = list(saes)
        self.saes = nn.ModuleDict({n.replace(".", "/"): s for n, s in saes.items()})

    def __getitem__(self, name: str) -> SparseAutoencoder:
        # ModuleDict's __getitem__ is typed Module; every entry is a SparseAutoencoder
        return cast(SparseAutoencoder, self.saes[name.replace(".", "/")])

    def forward(self, batches: dict[str, Tensor], dead: dict[str, Tensor]) -> dict[str, SAEOutput]:
        """batches {name: x [B, d_in]}, dead {name: bool [d_sae]} -> {name: SAEOutput}."""
        return {n: self[n](batches[n], dead_mask=dead[n]) for n in self.names}


class SuiteTrainer:
    """Adam (fused where supported) at `train.lr` x `sae.lr_mult`, warm-up/decay LR schedule,
    per-SAE input scale (from its first global batch, so that E||x * scale||^2 = d_in; b_dec
    starts at that batch's geometric median), dead-latent counters over global batches, per-SAE
    gradient clipping (DeepSpeed: clipping of the global norm, by its `gradient_clipping`).

    `trainer.kind`: single / sharded train locally; ddp and zero2 / zero3 average gradients
    across processes. The module is handed to accelerate at the first step, after the
    data-dependent initialisation, so that DeepSpeed's partitions start from it."""

    def __init__(
        self,
        hookpoints: list[Hookpoint],
        cfg: TrainRunConfig,
        d_in: int,
        accelerator: Accelerator,
        world: int = 1,
    ):
        t = cfg.train
        self.cfg, self.accelerator = cfg, accelerator
        self.data_parallel = cfg.trainer.kind.data_parallel
        self.world = world if self.data_parallel else 1
        self.group = BatchGroup(self.data_parallel and world > 1)
        self.hookpoints = {hp.name: hp for hp in hookpoints}
        saes = {hp.name: seeded_sae(cfg, hp.name, d_in) for hp in hookpoints}
        for sae in saes.values():
            sae.batch_group = self.group
            sae.project_decoder_grads()
        self.suite = SAESuite(saes).to(accelerator.device)
        self.n_steps = max(1, t.tokens // t.batch_size)
        lr = (
            t.lr
            if t.lr is not None
            else 2e-4 / math.sqrt(self.suite[hookpoints[0].name].d_sae / 2**14)
        )
        groups = [
            g for hp in hookpoints for g in self.suite[hp.name].param_groups(lr * cfg.sae.lr_mult)
        ]
        beta1, beta2 = t.adam_betas  # two values (validate)
        self.optimizer = torch.optim.Adam(groups, lr=lr, betas=(beta1, beta2), fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.n_steps, t.lr_warmup_frac, t.lr_decay_frac)
        )
        self.engine: nn.Module | None = None
        self.scales: dict[str, float | None] = dict.fromkeys(self.hookpoints)
        self.step_count = 0
        self.tokens_since_fired = {
            n: torch.zeros(s.d_sae, dtype=torch.long, device=accelerator.device)
            for n, s in saes.items()
        }

    @property
    def names(self) -> list[str]:
        return self.suite.names

    @property
    def done(self) -> bool:
        return self.step_count >= self.n_steps

    @property
    def zero_stage(self) -> int:
        return self.cfg.trainer.kind.zero_stage

    def sae(self, name: str) -> SparseAutoencoder:
        return self.suite[name]

    def scale(self, name: str) -> float:
        """The input scale of a calibrated SAE (`calibrate`, or restored from a checkpoint)."""
        scale = self.scales[name]
        assert scale is not None, f"{name} has no input scale before its first step"
        return scale

    def calibrate(self, batches: dict[str, Tensor]) -> None:
        """Input scales and data-dependent initialisation (`init_from_batch`: b_dec, and e.g.
        JumpReLU thresholds) of the SAEs that have none, from their first global batches
        {name: raw activations [B, d_in]}."""
        for name, x in batches.items():
            if self.scales[name] is None:
                mean_sq = self.group.sum(x.pow(2).sum()) / self.group.sum(
                    x.new_tensor(float(x.shape[0]))
                )
                scale = math.sqrt(x.shape[1] / float(mean_sq))
                self.scales[name] = scale
                self.sae(name).init_from_batch(x * scale)

    def prepare(self) -> None:
        """Hand module, optimizer and schedule to accelerate (DDP / DeepSpeed wrapping); the
        SAEs of a sharded process are its own, so they stay unwrapped."""
        if not self.data_parallel:
            self.engine = self.suite
            return
        self.engine, self.optimizer, self.scheduler = self.accelerator.prepare(
            self.suite, self.optimizer, self.scheduler
        )

    def step(self, batches: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """One optimizer step of every SAE on its batch {name: raw activations [B, d_in]} (this
        process's part of the global batch); returns detached global metrics per SAE."""
        if self.engine is None:
            self.calibrate(batches)
            self.prepare()
        assert self.engine is not None  # set by prepare() at the first step
        dead = {n: c >= self.cfg.sae.dead_tokens for n, c in self.tokens_since_fired.items()}
        scaled = {n: x * self.scale(n) for n, x in batches.items()}
        for name in self.names:
            self.sae(name).set_progress(self.step_count / self.n_steps)
        with self.accelerator.autocast():
            outs = self.engine(scaled, dead)
        loss = sum(sum(o.losses.values()) for o in outs.values())
        self.accelerator.backward(loss * self.world)
        if not self.zero_stage:
            for name in self.names:
                nn.utils.clip_grad_norm_(self.sae(name).parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._after_step(outs)
        metrics = {}
        for name, out in outs.items():
            metrics[name] = self._update_counters(name, out, dead[name], batches[name].shape[0])
        self.step_count += 1
        return metrics

    def _update_counters(
        self, name: str, out: SAEOutput, dead: Tensor, n_local: int
    ) -> dict[str, Tensor]:
        fired = self.group.sum(out.latents.fire_counts()) > 0
        n = self.group.sum(torch.tensor(float(n_local)))
        counter = self.tokens_since_fired[name]
        counter += int(n)
        counter[fired] = 0
        # sum() types its result int | Tensor; the SAE's losses (a non-empty dict) give a Tensor
        loss = cast(Tensor, sum(out.losses.values()))
        return {
            "loss": loss.detach(),
            "fvu": out.losses["fvu"].detach(),
            "l0": self.group.sum(out.latents.l0().sum().detach()) / n,
            "dead_frac": dead.float().mean(),
            "lr": torch.tensor(self.scheduler.get_last_lr()[0]),
        }

    @torch.no_grad()
    def _after_step(self, outs: dict[str, SAEOutput]) -> None:
        """Each SAE's own changes after the optimizer step: unit-norm decoder rows and
        `after_step` (running statistics; e.g. JumpReLU's thresholds), made on the fp32
        master copies of its `edited_parameters` under ZeRO (`_on_masters`)."""
        for name in self.names:
            sae = self.sae(name)
            with self._on_masters(sae):
                sae.normalize_decoder()
                sae.after_step(outs[name])

    @contextmanager
    def _on_masters(self, sae: SparseAutoencoder) -> Iterator[None]:
        """Under ZeRO, in the block every parameter named in `sae.edited_parameters` holds its
        full fp32 master copy; edits made there go to the master and then to the module's
        parameter. ZeRO keeps the masters apart from the module's parameters (partitioned under
        ZeRO-3), and its next step would copy them over an edit of the module's alone. Without
        ZeRO the block edits the parameters themselves."""
        if not self.zero_stage:
            yield
            return
        import deepspeed  # only under ZeRO: its import takes seconds and probes the accelerator
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        params = [getattr(sae, name) for name in sae.edited_parameters]
        with deepspeed.zero.GatheredParameters(
            params, modifier_rank=0, enabled=self.zero_stage == 3
        ):
            module = [p.data for p in params]
            for p in params:
                full = safe_get_full_fp32_param(p)
                assert full is not None  # every parameter of a ZeRO engine has a master copy
                p.data = full.to(p.device)
            yield
            for p, own in zip(params, module):
                safe_set_full_fp32_param(p, p.data)
                own.copy_(p.data.to(own.dtype))
                p.data = own

    def folded_saes(self) -> dict[str, SparseAutoencoder]:
        """The SAEs for raw activations (input scales folded into the weights), on CPU. A
        collective under ZeRO-3 (parameters gathered): call it on every process; there the
        other processes get {} (DeepSpeed gathers the weights on the main process only)."""
        # get_state_dict is unannotated (its inferred union includes DeepSpeed's
        # config-dependent returns); it gives the module's {name: tensor}, or None off the main
        # process under ZeRO-3
        state = cast(
            "dict[str, Tensor] | None",
            self.accelerator.get_state_dict(self.engine)
            if self.engine is not None
            else self.suite.state_dict(),
        )
        if state is None:
            return {}
        out = {}
        for name in self.names:
            sae = self.sae(name)
            prefix = f"saes.{name.replace('.', '/')}."
            copy = build_sae(self.cfg.sae, sae.d_in)
            copy.load_state_dict(
                {k[len(prefix) :]: v.cpu() for k, v in state.items() if k.startswith(prefix)}
            )
            out[name] = copy.folded(self.scales[name] or 1.0)
        return out

    # --- checkpoints -----------------------------------------------------------------------

    def state_dict(self, name: str) -> dict[str, Any]:
        """One SAE's resumable state: weights, Adam state by parameter name (absent under
        DeepSpeed, which saves its own partitions), input scale, dead counters, step."""
        sae = self.sae(name)
        adam = (
            {}
            if self.zero_stage
            else {
                pname: self._optimizer().state[p]
                for pname, p in sae.named_parameters()
                if p in self._optimizer().state
            }
        )
        return {
            "sae": sae.state_dict(),
            "adam": adam,
            "scale": self.scales[name],
            "tokens_since_fired": self.tokens_since_fired[name].cpu(),
            "step_count": self.step_count,
            "scheduler": self._scheduler().state_dict(),
        }

    def load_state_dict(self, name: str, state: dict[str, Any]) -> None:
        sae = self.sae(name)
        sae.load_state_dict(state["sae"])
        params = dict(sae.named_parameters())
        for pname, value in state["adam"].items():
            self._optimizer().state[params[pname]] = {
                k: v.to(params[pname].device) for k, v in value.items()
            }
        self.scales[name] = state["scale"]
        self.tokens_since_fired[name].copy_(state["tokens_since_fired"])
        self.step_count = state["step_count"]
        scheduler = self._scheduler()
        scheduler.load_state_dict(state["scheduler"])
        # the optimizer's learning rate is the schedule's value at the saved step (a fresh
        # optimizer starts at lr x factor(0), which the next step would use otherwise)
        for group, lr in zip(self._optimizer().param_groups, scheduler.get_last_lr()):
            group["lr"] = lr

    def memory_mb(self) -> dict[str, float]:
        """MB this process holds for its SAEs: `sae_params_mb` (module parameters) and
        `optimizer_mb` (what the innermost optimizer steps, e.g. ZeRO's fp32 partition, plus its
        Adam moments)."""
        # accelerate's and DeepSpeed's wrappers hold the optimizer they wrap as `.optimizer`
        opt: torch.optim.Optimizer = self.optimizer
        while (inner := getattr(opt, "optimizer", None)) is not None:
            opt = inner
        stepped = sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
        moments = sum(
            v.numel() * v.element_size()
            for st in opt.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )
        params = sum(p.numel() * p.element_size() for p in self.suite.parameters())
        return {"sae_params_mb": params / 2**20, "optimizer_mb": (stepped + moments) / 2**20}

    def _optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return getattr(self.scheduler, "scheduler", self.scheduler)
