"""Model-level evaluation machinery: one clean forward pass, spliced passes that start at the
spliced layer, and next-token cross-entropy / KL at a fixed set of positions (DESIGN.md
section 8).

The cheapest correct scheme, and why:

- A splice at layer L changes nothing before layer L, so a spliced pass need not repeat layers
  0..L-1: the clean pass records the hidden state entering each needed layer (and the keyword
  arguments the HF model hands every decoder layer: rotary position embeddings, attention mask,
  position ids), and a spliced pass replays only layers L..N-1, the final norm and the LM head
  (`replay_from`). The splice hook fires inside the replayed layer L as in a full forward.
- A spliced pass cannot stop early: CE and KL need the logits, so every later layer runs.
- Several passes that start at the same layer (the SAE splice, the zero and the optional mean
  ablation of every site of that layer) can run as one batch of `n_variants x B` sequences;
  each variant's hook edits only its own rows. That helps on a GPU; on CPU larger batches are
  slower per token, so there the callers cap a replay at one batch's worth of positions.
- The LM head (often the largest matmul of a small model) runs only at the CE positions, in
  chunks of `chunk` positions, so the [B, T, vocab] logits never exist; the clean logits and
  probs at the CE positions are computed once per batch and reused by every variant.
- After the head, CE needs only logsumexp(z) and z[target], and KL(p_clean || p) =
  <p_clean, z_clean - z> + lse - lse_clean (`NextTokenScorer`): no log-softmax is materialised,
  nothing of size vocab is float64, and on CPU that work runs on cache-sized slices of rows.

Cost per batch: one clean pass + sum over variants of (N - L_v) / N passes + one LM head per
variant, instead of (1 + n_variants) full passes. That is the floor of this scheme; on a
2-core CPU the measured cost is within about 15 % of it (`sae_dist.evaluate`, benchmarks/README.md).

Positions (the same for ce_clean, ce_spliced, ce_zero, ce_mean and kl): position t of a row
counts iff train_mask[t] is True and t + 1 exists in the row; its target is input_ids[t + 1].
Splices replace the activation at the positions the token policy keeps (the train mask less
the outliers, sae_dist.policy) and leave the others (BOS, chat control tokens, outliers)
untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sae_dist.evaluate.spread import merge_parts, sum_by_document
from sae_dist.hookpoints import (
    HookFn,
    Hookpoint,
    decoder_layers,
    decoder_stack,
    final_norm,
    hooks,
    unembedding,
)

SPLICE_POSITIONS = "train_mask less the token policy's outliers"
"""Where splices act: the positions the token policy keeps (others keep the clean value)."""
CE_POSITIONS = "t with train_mask[t] and t+1 in the row; target input_ids[t+1]"
"""The positions of every cross-entropy and KL metric."""


def ce_positions(input_ids: Tensor, train_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sel bool [B, T], targets int64 [n]): positions t with train_mask[t] and t < T-1, and
    their next tokens input_ids[t+1] (row-major order, as `h[sel]` selects)."""
    sel = train_mask.clone()
    sel[:, -1] = False
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    return sel, targets[sel]


@dataclass
class CleanPass:
    """What one clean forward pass of a batch [B, T] leaves for the metrics and the replays."""

    acts: dict[Hookpoint, Tensor]
    """Activation [B, T, d_model] at every evaluated hookpoint (model dtype)."""
    layer_inputs: dict[int, Tensor]
    """Hidden state [B, T, d_model] entering each layer a replay starts at."""
    layer_kwargs: dict[int, dict[str, Any]]
    """Keyword arguments the model passed to each decoder layer >= the first replay layer."""
    final: Tensor
    """Final-normed hidden state [B, T, d_model] (input of the LM head)."""


@torch.no_grad()
def clean_pass(
    model: nn.Module, input_ids: Tensor, hookpoints: list[Hookpoint], start_layers: list[int]
) -> CleanPass:
    """Run the decoder stack once (no LM head) and record activations, layer inputs and kwargs."""
    layers = decoder_layers(model)
    acts: dict[Hookpoint, Tensor] = {}
    inputs: dict[int, Tensor] = {}
    kwargs: dict[int, dict[str, Any]] = {}
    first = min(start_layers, default=len(layers))

    def store(hp: Hookpoint) -> HookFn:
        return lambda act: acts.__setitem__(hp, act.detach()) or None

    def pre(i: int):
        def hook(module, args, kw):
            if i in start_layers:
                inputs[i] = (args[0] if args else kw["hidden_states"]).detach()
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}

        return hook

    handles = [
        layers[i].register_forward_pre_hook(pre(i), with_kwargs=True)
        for i in range(first, len(layers))
    ]
    try:
        with hooks(model, {hp: store(hp) for hp in hookpoints}):
            out = decoder_stack(model)(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return CleanPass(acts, inputs, kwargs, out.last_hidden_state)


def _repeat_rows(obj: Any, batch: int, n: int) -> Any:
    """Tile tensors whose leading dim is the batch size `batch` (> 1) n times; recurse tuples."""
    if isinstance(obj, Tensor) and obj.dim() > 0 and obj.shape[0] == batch and batch > 1:
        return obj.repeat(n, *([1] * (obj.dim() - 1)))
    if isinstance(obj, tuple):
        return tuple(_repeat_rows(o, batch, n) for o in obj)
    return obj


Edit = Callable[[Tensor], None]
"""A variant's splice: edits, in place, the activation rows [B, T, d] of its own batch slice
(a view of a fresh copy, never the module's own output)."""


@torch.no_grad()
def replay_from(
    model: nn.Module, clean: CleanPass, start: int, variants: list[dict[Hookpoint, Edit]]
) -> Tensor:
    """Final-normed hidden states [n_variants, B, T, d] of the spliced passes `variants`, all run
    as one batch from layer `start` (every hookpoint in `variants` must be at a layer >=
    `start`; layers before `start` are taken from the clean pass)."""
    h0 = clean.layer_inputs[start]
    n, batch = len(variants), h0.shape[0]
    by_hp: dict[Hookpoint, list[tuple[int, Edit]]] = {}
    for v, edits in enumerate(variants):
        for hp, fn in edits.items():
            if hp.layer < start:
                raise ValueError(f"{hp} is before the replay start layer {start}")
            by_hp.setdefault(hp, []).append((v, fn))

    def hook(edits: list[tuple[int, Edit]]) -> HookFn:
        def fn(act: Tensor) -> Tensor:
            out = act.clone()
            for v, edit in edits:
                edit(out[v * batch : (v + 1) * batch])
            return out

        return fn

    h = h0.repeat(n, *([1] * (h0.dim() - 1)))
    layers = decoder_layers(model)
    with hooks(model, {hp: hook(e) for hp, e in by_hp.items()}):
        for i in range(start, len(layers)):
            kw = {k: _repeat_rows(v, batch, n) for k, v in clean.layer_kwargs[i].items()}
            h = layers[i](h, **kw)
            h = h[0] if isinstance(h, tuple) else h
    h = final_norm(model)(h)
    return h.view(n, batch, *h.shape[1:])


def masked_edit(mask: Tensor, values: Tensor) -> Edit:
    """In-place splice setting the activation at the True positions of mask [B, T] to
    values [n, d] (one row per True position, row-major) or [d] (the same vector everywhere)."""

    def edit(view: Tensor) -> None:
        view[mask] = (
            values.to(view.dtype)
            if values.dim() == 2
            else values.to(view.dtype).expand(int(mask.sum()), -1)
        )

    return edit


CPU_SLICE_ELEMS = 1 << 20
"""On CPU the vocabulary-wide work after the LM head runs on slices of about this many logits
(4 MB of float32 temporaries, which stay in cache); on GPU on whole LM-head chunks."""


class NextTokenScorer:
    """Clean next-token distributions at the CE positions of one batch, to score spliced passes.

    `final` [B, T, d] (clean, final-normed), `sel` bool [B, T], `targets` int64 [n]. The LM
    head runs on `chunk` positions at a time in the model's dtype, like the HF forward (the
    logits z are those of the model); everything after it is exact maths on z:

    - lse = logsumexp(z) as max + log(sum exp(z - max)), the sum in float32, the log and the
      add in float64; CE = lse - z[target] (float64).
    - KL(p_clean || p) = sum_v p_clean,v (z_clean,v - z_v) + (lse - lse_clean) * sum_v p_clean,v,
      which is sum p_clean (log p_clean - log p) regrouped: the logit differences are exact in
      float32 (differences of model-dtype numbers), the row sum is a float32 reduction (pairwise
      on CPU, a tree on GPU), and KL is exactly 0 when the logits equal the clean ones.

    The clean logits (model dtype), clean probs (float32) and per-position lse_clean and
    sum p_clean are kept for the batch (n x vocab x 6 bytes for a bf16 model). On CPU the work
    after the LM head runs on slices of `CPU_SLICE_ELEMS` logits, so its float32 temporaries
    stay in cache instead of being fresh [chunk, vocab] allocations (page faults, memory
    traffic): that work costs about 0.4x the LM head matmul instead of about 1x.
    """

    def __init__(
        self, model: nn.Module, final: Tensor, sel: Tensor, targets: Tensor, chunk: int = 256
    ):
        self.head, self.sel, self.chunk = unembedding(model), sel, chunk
        vocab = self.head.weight.shape[0]
        self.slice = (
            chunk if final.device.type != "cpu" else max(1, min(chunk, CPU_SLICE_ELEMS // vocab))
        )
        self.targets = [u for t in targets.split(chunk) for u in t.split(self.slice)]
        self.z_clean, self.p_clean, self.lse_clean, self.psum_clean, ce = [], [], [], [], []
        for z, t in zip(self._logits(final), self.targets):
            e, m, s = _exp_shifted(z)
            lse = m.double() + s.double().log()
            p = e.div_(s[:, None])
            self.z_clean.append(z)
            self.p_clean.append(p)
            self.lse_clean.append(lse)
            self.psum_clean.append(p.sum(-1).double())
            ce.append(lse - z.gather(1, t[:, None])[:, 0].double())
        self.ce_clean = torch.cat(ce)

    @property
    def n(self) -> int:
        return int(self.sel.sum())

    def _logits(self, final: Tensor):
        """Logits [<= slice, vocab] (model dtype) of the CE positions, slice by slice."""
        for h in final[self.sel].split(self.chunk):
            z = self.head(h)
            yield from z.split(self.slice)

    @torch.no_grad()
    def score(self, final: Tensor, with_kl: bool = True) -> tuple[Tensor, Tensor | None]:
        """final [B, T, d] of a spliced pass -> per-position (CE, KL(p_clean || p_spliced) or
        None without `with_kl`), float64 [n] each."""
        ce, kl = [], []
        for i, (z, t) in enumerate(zip(self._logits(final), self.targets)):
            e, m, s = _exp_shifted(z)
            lse = m.double() + s.double().log()
            ce.append(lse - z.gather(1, t[:, None])[:, 0].double())
            if with_kl:
                d = e.copy_(self.z_clean[i]).sub_(z)  # z_clean - z, exact in float32
                dot = d.mul_(self.p_clean[i]).sum(-1).double()
                kl.append(dot + (lse - self.lse_clean[i]) * self.psum_clean[i])
        return torch.cat(ce), torch.cat(kl) if with_kl else None


def _exp_shifted(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """z [m, v] -> (exp(z - max) float32 [m, v] (a new tensor), max float32 [m],
    sum exp(z - max) float32 [m])."""
    e = z.float() if z.dtype != torch.float32 else z.clone()
    m = e.amax(-1)
    e.sub_(m[:, None]).exp_()
    return e, m, e.sum(-1)


@dataclass
class ModelLevelAccumulator:
    """Float64 sums of per-position CE (clean and per kind of splice) and KL for one SAE, and
    per-sequence sums of the CE change (spliced - clean) for the standard error of delta_loss.

    delta_loss_se is `cluster_se` over sequences (batch rows): the CE changes of positions in
    one sequence are correlated, so treating positions as independent would understate it.
    """

    n: int = 0
    sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl"), 0.0
        )
    )
    has_mean: bool = False
    seq_delta: list[Tensor] = field(default_factory=list)
    """float64 [rows] per batch: sum of spliced - clean CE over each row's CE positions."""
    seq_positions: list[Tensor] = field(default_factory=list)
    """float64 [rows] per batch: CE positions of each row."""
    doc_parts: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    """Per batch, columns ce_n and ce_delta: (document ids, per-document sums)."""
    batch: tuple[Tensor, Tensor, Tensor] | None = None
    """(clean CE [n] float64, row index [n] int64, document id [n] int64) of the batch being
    scored."""

    def add_clean(self, ce_clean: Tensor, rows: Tensor, docs: Tensor) -> None:
        """Clean CE per CE position [n] of one batch, each position's row in the batch [n]
        (row-major order, as `h[sel]` selects) and its document id [n]."""
        self.n += ce_clean.numel()
        self.sums["ce_clean"] += float(ce_clean.sum())
        self.batch = (ce_clean.double(), rows, docs)

    def add(self, kind: str, ce: Tensor, kl: Tensor | None = None) -> None:
        """CE (and for kind 'spliced' the KL) per position [n] of the batch of `add_clean`."""
        self.sums[f"ce_{kind}"] += float(ce.sum())
        self.has_mean |= kind == "mean"
        if kind != "spliced":
            return
        if kl is not None:
            self.sums["kl"] += float(kl.sum())
        assert self.batch is not None  # add_clean comes first
        clean, rows, docs = self.batch
        delta = ce.double() - clean
        self.seq_delta.append(torch.bincount(rows, weights=delta).cpu())
        self.seq_positions.append(torch.bincount(rows).double().cpu())
        for name, values in (("ce_n", torch.ones_like(delta)), ("ce_delta", delta)):
            self.doc_parts.setdefault(name, []).append(sum_by_document(docs, values))

    def by_document(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{column: (document ids [u], per-document sums)} for `DocumentSums.from_columns`."""
        return {name: merge_parts(parts) for name, parts in self.doc_parts.items()}

    def by_sequence(self) -> dict[str, list]:
        """Per sequence with a CE position, in batch order: the summed CE change (nats) and the
        CE positions; two SAEs scored on the same batches compare pairwise with `cluster_se`
        of the differences of their sums (`paired_delta`)."""
        s, n_g = torch.cat(self.seq_delta), torch.cat(self.seq_positions)
        return {"delta_sum": s[n_g > 0].tolist(), "positions": n_g[n_g > 0].long().tolist()}

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no evaluation position passed the mask")
        m = {k: v / self.n for k, v in self.sums.items()}
        out = {
            "ce_clean": m["ce_clean"],
            "ce_spliced": m["ce_spliced"],
            "ce_zero": m["ce_zero"],
            "delta_loss": m["ce_spliced"] - m["ce_clean"],
            "delta_loss_se": cluster_se(**self.by_sequence()),
            "loss_recovered": _ratio(m["ce_zero"] - m["ce_spliced"], m["ce_zero"] - m["ce_clean"]),
            "kl": m["kl"],
            "ce_tokens": self.n,
        }
        if self.has_mean:
            out["ce_mean"] = m["ce_mean"]
        return out


def cluster_se(delta_sum: Sequence[float], positions: Sequence[int]) -> float:
    """Cluster-robust standard error of a per-position mean from per-cluster sums S_g over n_g
    positions (G clusters, n positions, mean D = sum S_g / n):
    sqrt(G / (G - 1) * sum_g (S_g - D n_g)^2) / n; NaN under two clusters."""
    s = torch.tensor(delta_sum, dtype=torch.float64)
    n_g = torch.tensor(positions, dtype=torch.float64)
    g = s.numel()
    if g < 2:
        return float("nan")
    mean = s.sum() / n_g.sum()
    return float((g / (g - 1) * (s - mean * n_g).pow(2).sum()).sqrt() / n_g.sum())


def paired_delta(a: dict[str, list], b: dict[str, list]) -> tuple[float, float]:
    """(delta_loss of a - delta_loss of b, its cluster-robust standard error) from the
    `ModelLevelAccumulator.by_sequence` records of two SAEs scored on the same batches."""
    if a["positions"] != b["positions"]:
        raise ValueError("paired_delta needs both SAEs scored on the same sequences")
    diff = [x - y for x, y in zip(a["delta_sum"], b["delta_sum"])]
    return sum(diff) / sum(a["positions"]), cluster_se(diff, a["positions"])


def _ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (ablating the site does not change the loss at all)."""
    return a / b if b != 0 else float("nan")
