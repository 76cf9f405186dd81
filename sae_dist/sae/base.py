"""The interface every SAE architecture shares, and the architecture registry.

An architecture is one file with a `SparseAutoencoder` subclass decorated with
`@register("<name>")`. It implements `_encode` (latents and pre-activations) and, if it adds
loss terms, `aux_losses`; sparse latents decode through an `embedding_bag`. Parameters,
decoder constraints, input-scale folding and the SAELens v6 layout are shared.

The trainer calls `init_from_batch` once with the first (scaled) batch, `param_groups` to build
its optimizer, `set_progress` before each step (scheduled loss coefficients read
`self.progress`) and `after_step` after the optimizer step (running statistics, and edits of
the `edited_parameters`).

Shapes: B tokens, d_in activation width, d_sae latents, k active latents per token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, TypeVar

import torch
from torch import Tensor, nn

from sae_dist.config import SAEConfig, sae_config
from sae_dist.distributed import LOCAL, BatchGroup
from sae_dist.sae.sparse_ops import Entries, GatheredPreActs

SAE_REGISTRY: dict[str, type[SparseAutoencoder]] = {}
"""Architecture name (`SAEConfig.architecture`, SAELens `architecture`) -> class."""

S = TypeVar("S", bound="SparseAutoencoder")


def register(name: str) -> Callable[[type[S]], type[S]]:
    """Class decorator: add the class to `SAE_REGISTRY` under `name` and set `architecture`."""

    def add(cls: type[S]) -> type[S]:
        if name in SAE_REGISTRY:
            raise ValueError(f"SAE architecture {name!r} is registered twice")
        cls.architecture = name
        if "saelens_architecture" not in cls.__dict__:
            cls.saelens_architecture = name
        SAE_REGISTRY[name] = cls
        return cls

    return add


@dataclass
class Latents:
    """Latent activations of a batch, sparse (values at indices) or dense."""

    values: Tensor
    """[B, k] when `indices` is given, else dense [B, d_sae]."""
    indices: Tensor | None
    """int64 [B, k] latent ids of `values`, or None for dense latents."""
    d_sae: int
    live: Tensor | None = None
    """bool [B, k]: the entries that take part (others are padding, with value 0 and no
    gradient); None: all of them."""

    def dense(self) -> Tensor:
        """[B, d_sae] latent matrix (differentiable in `values`)."""
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(self.values.shape[0], self.d_sae)
        return out.scatter_add(1, self.indices, self.values)

    def l0(self) -> Tensor:
        """[B] float: number of latents > 0 per token."""
        return (self.values > 0).sum(-1).float()

    def fire_counts(self) -> Tensor:
        """int64 [d_sae]: number of tokens on which each latent is > 0."""
        fired = self.values > 0
        if self.indices is None:
            return fired.sum(0)
        return torch.bincount(self.indices[fired], minlength=self.d_sae)


@dataclass
class SAEOutput:
    """What `SparseAutoencoder.forward` returns."""

    x_hat: Tensor
    """[B, d_in] reconstruction."""
    latents: Latents
    losses: dict[str, Tensor]
    """Weighted scalar loss terms; the training loss is their sum."""


def batch_mean(x: Tensor, group: BatchGroup = LOCAL) -> Tensor:
    """Mean over the global batch of the rows of x [B, ...] -> [...] (no gradient)."""
    x = x.detach()
    return group.sum(x.sum(0)) / group.sum(x.new_tensor(float(x.shape[0])))


def total_variance(x: Tensor, group: BatchGroup = LOCAL) -> Tensor:
    """sum over the global batch of ||x - mean(x)||^2 for x [B, d] -> scalar (no gradient)."""
    return group.sum((x.detach() - batch_mean(x, group)).pow(2).sum())


def fvu(x: Tensor, x_hat: Tensor, group: BatchGroup = LOCAL) -> Tensor:
    """Fraction of variance unexplained over the global batch: x, x_hat [B, d_in] -> scalar."""
    return group.sum((x - x_hat).pow(2).sum()) / total_variance(x, group)


def geometric_median(
    x: Tensor, iters: int = 100, tol: float = 1e-6, group: BatchGroup = LOCAL
) -> Tensor:
    """Point minimising the summed Euclidean distance to the rows of x [N, d] (over the global
    batch) -> [d] (Weiszfeld's algorithm, started at the mean)."""
    median = batch_mean(x, group)
    for _ in range(iters):
        weights = 1 / torch.linalg.vector_norm(x - median, dim=1).clamp_min(1e-8)
        new = group.sum(weights @ x) / group.sum(weights.sum())
        step = torch.linalg.vector_norm(new - median)
        median = new
        if step <= tol * torch.linalg.vector_norm(median).clamp_min(1.0):
            break
    return median


def parallel_free(w: Tensor, grad: Tensor) -> Tensor:
    """grad [d_sae, d_in] without its component along each row of w [d_sae, d_in]: row-wise dot
    products (a batched matmul), row norms and one fused multiply-add (no temporary of that
    size besides the result)."""
    w = w.detach()
    dots = torch.bmm(grad.unsqueeze(1), w.unsqueeze(2)).view(-1)
    coef = dots / torch.linalg.vector_norm(w, dim=1).square().clamp_min(1e-12)
    return torch.addcmul(grad, coef.unsqueeze(1), w, value=-1)


class SparseAutoencoder(nn.Module):
    """Base SAE: x [B, d_in] -> latents -> x_hat = latents @ W_dec + b_dec.

    Parameters (float32, named as in SAELens): W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_in], b_dec [d_in]. `b_dec` is subtracted from x before encoding.
    """

    architecture: ClassVar[str]
    saelens_architecture: ClassVar[str]
    """The SAELens v6 `architecture` this class exports as (default: `architecture`)."""
    saelens_fields: ClassVar[tuple[str, ...]] = ()
    """Config fields written to, and read back from, the SAELens cfg (e.g. "k")."""
    edited_parameters: ClassVar[tuple[str, ...]] = ("W_dec",)
    """Parameters that `normalize_decoder` and `after_step` change outside the optimizer (the
    trainer makes such changes reach ZeRO's fp32 master copies)."""
    sparse: bool = True
    """Sparse kernels where the latents are sparse (the training default); False selects the
    plain-autograd dense reference path, with the same results."""

    def __init__(self, cfg: SAEConfig, d_in: int):
        super().__init__()
        self.cfg, self.d_in, self.d_sae = cfg, d_in, cfg.latents(d_in)
        self.progress = 1.0
        """Fraction of training done, set by the trainer (`set_progress`); 1 outside training."""
        self.batch_group: BatchGroup = LOCAL
        """The processes sharing each training batch: loss normalisers and batch statistics
        are taken over the global batch (set by the trainer under data parallelism)."""
        self.W_enc = nn.Parameter(torch.empty(d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit-norm decoder rows, W_enc = W_dec.T, zero biases (seed via torch)."""
        self.W_dec.normal_()
        self.normalize_decoder()
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    # --- encoding and decoding -------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations: (x - b_dec) @ W_enc + b_enc, [B, d_in] -> [B, d_sae].
        One addmm: on CPU faster than matmul + add, and under bf16 autocast it stays in bf16
        (a separate bf16 + float32 bias add costs more than the bf16 matmul itself)."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def _encode(self, x: Tensor) -> tuple[Latents, Tensor]:
        """x [B, d_in] -> (latents, pre-activations [B, d_sae]); `pre` is part of the autograd
        graph only where the architecture differentiates through it densely."""
        raise NotImplementedError

    def _activate(
        self, x: Tensor, pre: Tensor, indices: Tensor, keep: Tensor | None = None
    ) -> Tensor:
        """relu(pre) gathered at indices int64 [B, j], zero where `keep` [B, j] is False ->
        [B, j], differentiable in the weights."""
        if not self.sparse:
            values = torch.relu(pre.gather(1, indices))
            return values if keep is None else values * keep
        pre_top = pre.detach().gather(1, indices)
        if keep is not None:
            pre_top = pre_top.masked_fill(~keep, 0)
        return torch.relu(
            GatheredPreActs.apply(
                x, self.W_enc, self.b_enc, self.b_dec, pre_top, Entries.of(indices, keep)
            )
        )

    def encode(self, x: Tensor) -> Latents:
        """x [B, d_in] -> latents."""
        return self._encode(x)[0]

    def _decode_latents(self, latents: Latents) -> Tensor:
        """sum_l latents[:, l] * W_dec[l], without b_dec: [B, d_in]. Sparse latents
        (values/indices [B, j]) go through an `embedding_bag` over their live entries' decoder
        rows (unless `sparse` is False), dense ones through a matmul."""
        if latents.indices is None or not self.sparse:
            return latents.dense().to(self.W_dec.dtype) @ self.W_dec
        return Entries.of(latents.indices, latents.live).bag_sum(latents.values, self.W_dec)

    def decode(self, latents: Latents) -> Tensor:
        """latents -> x_hat [B, d_in] (includes + b_dec)."""
        return self._decode_latents(latents) + self.b_dec

    def aux_losses(
        self, x: Tensor, x_hat: Tensor, latents: Latents, pre: Tensor, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        """Weighted architecture-specific loss terms (none by default)."""
        return {}

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        """x [B, d_in], dead_mask bool [d_sae] or None -> x_hat, latents and losses
        ("fvu" plus the architecture's auxiliary terms)."""
        latents, pre = self._encode(x)
        x_hat = self.decode(latents)
        losses = {"fvu": fvu(x, x_hat, self.batch_group)}
        losses.update(self.aux_losses(x, x_hat, latents, pre, dead_mask))
        return SAEOutput(x_hat, latents, losses)

    # --- training schedule and statistics --------------------------------------------------

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups at base learning rate `lr` (one group by default)."""
        return [{"params": list(self.parameters()), "lr": lr}]

    def set_progress(self, progress: float) -> None:
        """Fraction of training done (0 at the first step) for coefficient warm-ups."""
        self.progress = progress

    def warmup(self, frac: float) -> float:
        """Linear warm-up factor in [0, 1]: progress / frac, 1 once progress >= frac."""
        return 1.0 if frac <= 0 else min(1.0, self.progress / frac)

    @torch.no_grad()
    def after_step(self, out: SAEOutput) -> None:
        """Update running statistics from a training step's output (none by default)."""

    # --- training-time constraints ---------------------------------------------------------

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        """Data-dependent initialisation from the first training batch x [N, d_in] (this
        process's rows of the global batch, scaled inputs): b_dec = the global batch's geometric
        median. Architectures with thresholds extend it (the result must be the same on every
        process)."""
        self.b_dec.copy_(geometric_median(x.to(self.b_dec.dtype), group=self.batch_group))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every row of W_dec to unit norm."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-12))

    def project_decoder_grads(self) -> None:
        """From now on, every gradient of W_dec loses its component along each row of W_dec
        (the tangent space of the unit-norm rows). A gradient hook: it acts inside backward,
        before any cross-process reduction (DDP / ZeRO) and before clipping."""
        self.W_dec.register_hook(partial(parallel_free, self.W_dec))

    # --- export ----------------------------------------------------------------------------

    def folded(self, scale: float) -> SparseAutoencoder:
        """Copy that takes raw activations x when this SAE was trained on x * scale. The
        decoder rows stay unit-norm and the latents come out in raw units: every
        pre-activation, latent and threshold is 1/scale of the trained one (b_enc, b_dec and
        thresholds / scale; W_enc, W_dec unchanged), so the same latents fire and x_hat is in
        raw units. A latent's value is then the length of its (unit) decoder direction in the
        model's own activation scale."""
        out = copy.deepcopy(self)
        out.zero_grad(set_to_none=True)
        with torch.no_grad():
            out.b_enc.div_(scale)
            out.b_dec.div_(scale)
            out.scale_thresholds(1 / scale)
        return out

    @torch.no_grad()
    def scale_thresholds(self, factor: float) -> None:
        """Multiply the architecture's activation thresholds by `factor` (none by default)."""

    def saelens_tensors(self) -> dict[str, Tensor]:
        """SAELens v6 weights: name -> contiguous CPU copy (W_enc, b_enc, W_dec, b_dec, ...)."""
        return {
            name: p.detach().cpu().clone(memory_format=torch.contiguous_format)
            for name, p in self.named_parameters()
        }

    def saelens_cfg(self) -> dict:
        """SAELens v6 cfg keys describing this SAE (metadata is added by the checkpoint code)."""
        cfg = {
            "architecture": self.saelens_architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
        }
        cfg.update({name: getattr(self.cfg, name) for name in self.saelens_fields})
        return cfg

    @classmethod
    def from_saelens(cls, tensors: dict[str, Tensor], cfg: dict) -> SparseAutoencoder:
        """Inverse of `saelens_tensors` / `saelens_cfg` (CPU, float32)."""
        expected = {
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
        }
        for key, value in expected.items():
            if cfg.get(key, value) != value:
                raise ValueError(
                    f"SAELens cfg {key}={cfg[key]!r} is not supported; expected {value!r}"
                )
        fields = {name: cfg[name] for name in cls.saelens_fields}
        sae_cfg = sae_config(cls.architecture, d_sae=int(cfg["d_sae"]), **fields)
        sae = cls(sae_cfg, int(cfg["d_in"]))
        sae.load_saelens_tensors(tensors)
        return sae

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy SAELens tensors (names and shapes as `saelens_tensors` writes them, any float
        dtype) into the parameters."""
        params = dict(self.named_parameters())
        if set(tensors) != set(params):
            raise ValueError(
                f"SAELens tensors {sorted(tensors)} do not match the "
                f"{self.architecture} parameters {sorted(params)}"
            )
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(
                    f"SAELens tensor {name} has shape {tuple(tensors[name].shape)}; "
                    f"expected {tuple(p.shape)}"
                )
            p.copy_(tensors[name])
