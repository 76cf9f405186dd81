"""Feature discovery: one streaming pass over held-out chat tokens with every SAE of a suite,
keeping per feature its top contexts, activation-quantile samples, firing frequency, activation
histogram and token-set explanation score, plus each decoder row's logit lens; then the static
report (DESIGN.md section 9b).

`python -m sae_dist.features suite=<path> out_dir=<path> [features.tokens=<int>]`
(conf/features.yaml; `suite=` also takes one SAE folder or a folder of SAE folders).

Tokens. The held-out split of the data config (every `holdout_every`-th document), streamed in
batches and never held: a token is scored iff the token policy keeps it (`data.policy`: in the
train mask and not an outlier, sae_dist.policy), exactly the tokens `sae_dist.evaluate`
reconstructs (special and chat control tokens, BOS and outliers never reach an SAE). A feature
fires at a token when its activation is > 0. Positions are global: p = row * context_size +
column over the stream of packed rows.

Per feature, with memory fixed by d_sae and the config, never by the token count:
- top-N: the N firings with the largest activation (ties in any order). Kept as fixed-size
  tensors (priority, activation, position, context window) merged each batch: the batch's
  per-feature best N (one sort of its firings) joined to the running N, then top-N again.
- quantile samples: a uniform random sample without replacement of R = bins x per_bin firings,
  namely the R firings with the smallest key h(p, f), h a fixed 62-bit integer hash; kept with
  the same merge. "Exact" means: equal to sorting all firings of f by key and taking the first
  R, whatever the batching. The sample sorted by activation and cut into `bins` consecutive
  groups gives the activation-quantile bins (bin b holds the sample's b-th quantile range).
- frequency: firings / scored tokens; histogram: counts in fixed log-spaced bins.
- context windows: `window_before` tokens, the firing token, `window_after` tokens of its row
  (id -1 outside the row), with f's activation on each (0 on tokens not scored).
- token-set explanation and held-out F1: `sae_dist.features.score`.

Logit lens: W_dec[f] * g @ W_U^T, g the final norm's weight (RMSNorm gain, treated as an
elementwise gain) and W_U the unembedding: the direction's effect on the logits through the
final norm, not mean-centred, ignoring the normalisation's scale; lists the `logit_k` most
promoted and most suppressed tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_dist.config import FeaturesConfig
from sae_dist.data import TokenBatch
from sae_dist.features.score import TokenSetScorer, TokenSetScores, rank_within_groups
from sae_dist.hookpoints import Hookpoint, capture, final_norm
from sae_dist.policy import PositionFilter
from sae_dist.sae import Latents, SparseAutoencoder

log = logging.getLogger(__name__)

M32 = 0xFFFFFFFF

WindowFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(local positions [m], features [m]) -> (token ids int32 [m, W], activations float32 [m, W])."""


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing function on int64 tensors (values in [0, 2^32))."""
    x = x & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def event_keys(position: Tensor, feature: Tensor, seed: int = 0) -> Tensor:
    """int64 [E] keys in [0, 2^62), a fixed hash of (global position, feature, seed): the
    sampling priority of each firing (smaller = sampled first)."""
    a = _mix32(_mix32(position) ^ _mix32((position >> 32) + 0x9E3779B9 + seed))
    h1 = _mix32(a ^ _mix32(feature + 0x7F4A7C15))
    h2 = _mix32(h1 ^ _mix32(a + 0x68E31DA4))
    return (h1 << 30) | (h2 >> 2)


@dataclass
class Firings:
    """The firings (activation > 0) of one batch, one entry each."""

    position: Tensor
    """int64 [E] flat position in the batch: row * T + column."""
    feature: Tensor
    """int64 [E]."""
    value: Tensor
    """float32 [E] activation."""
    scored_index: Tensor
    """int64 [E] index of the token among the batch's scored tokens."""


def firings_of(latents: Latents, scored_pos: Tensor) -> Firings:
    """Firings of latents of the scored tokens (rows in the order of scored_pos [n], their flat
    positions), sparse or dense latents alike."""
    if latents.indices is not None:
        fired = latents.values > 0
        rows = fired.nonzero()[:, 0]
        feature, value = latents.indices[fired], latents.values[fired]
    else:
        rows, feature = (latents.values > 0).nonzero(as_tuple=True)
        value = latents.values[rows, feature]
    return Firings(scored_pos[rows], feature.long(), value.float(), rows)


class BatchWindows:
    """Context windows of one batch: token ids and one feature's activation per token."""

    def __init__(self, ids: Tensor, firings: Firings, d_sae: int, before: int, after: int):
        self.ids, self.d_sae, self.T = ids, d_sae, ids.shape[1]
        keys = firings.position * d_sae + firings.feature
        self.keys, order = keys.sort()
        self.values = firings.value[order]
        self.offsets = torch.arange(-before, after + 1, device=ids.device)

    def __call__(self, position: Tensor, feature: Tensor) -> tuple[Tensor, Tensor]:
        """(token ids int32 [m, W], -1 outside the row; activation float32 [m, W]) around
        the flat positions [m] for features [m]."""
        row, col = position // self.T, position % self.T
        cols = col[:, None] + self.offsets
        inside = (cols >= 0) & (cols < self.T)
        cols = cols.clamp(0, self.T - 1)
        tokens = self.ids[row[:, None], cols].int().masked_fill(~inside, -1)
        acts = torch.zeros(tokens.shape, dtype=torch.float32, device=position.device)
        if len(self.keys):
            query = (row[:, None] * self.T + cols) * self.d_sae + feature[:, None]
            at = torch.searchsorted(self.keys, query).clamp(max=len(self.keys) - 1)
            hit = (self.keys[at] == query) & inside
            acts = torch.where(hit, self.values[at], acts)
        return tokens, acts


class KeptExamples:
    """Per feature, the `n` firings of highest priority seen so far, with their windows.

    Tensors: priority [F, n] (int64 or float64; empty slots hold the dtype's minimum),
    value float32 [F, n], position int64 [F, n] (global, -1 empty), tokens int32 [F, n, W],
    acts float32 [F, n, W]; slots sorted by descending priority."""

    def __init__(self, d_sae: int, n: int, window: int, dtype: torch.dtype):
        lowest = torch.finfo(dtype).min if dtype.is_floating_point else torch.iinfo(dtype).min
        self.n, self.lowest = n, lowest
        self.priority = torch.full((d_sae, n), lowest, dtype=dtype)
        self.value = torch.zeros(d_sae, n)
        self.position = torch.full((d_sae, n), -1, dtype=torch.int64)
        self.tokens = torch.full((d_sae, n, window), -1, dtype=torch.int32)
        self.acts = torch.zeros(d_sae, n, window)

    def tensors(self) -> list[Tensor]:
        return [self.priority, self.value, self.position, self.tokens, self.acts]

    def merge(
        self, priority: Tensor, firings: Firings, position_offset: int, windows: WindowFn
    ) -> None:
        """Join a batch's firings (priority [E], larger first) to the kept ones; only firings
        that beat their feature's last kept one are ranked."""
        d_sae = self.priority.shape[0]
        worst = self.priority[:, -1].to(priority.device)
        beat = (priority.to(worst.dtype) > worst[firings.feature]).nonzero().squeeze(1)
        order, rank = rank_within_groups(firings.feature[beat], priority[beat], d_sae)
        events = beat[order[rank < self.n]]
        rows, cols = firings.feature[events].cpu(), rank[rank < self.n].cpu()
        cand = torch.full_like(self.priority, self.lowest)
        cand_event = torch.full(self.priority.shape, -1, dtype=torch.int64)
        cand[rows, cols] = priority[events].cpu().to(cand.dtype)
        cand_event[rows, cols] = events.cpu()
        joined = torch.cat([self.priority, cand], 1)
        self.priority, top = joined.topk(self.n, dim=1, sorted=True)
        old = top.clamp(max=self.n - 1)
        for name in ("value", "position", "tokens", "acts"):
            t = getattr(self, name)
            idx = old if t.dim() == 2 else old[..., None].expand(-1, -1, t.shape[2])
            setattr(self, name, t.gather(1, idx))
        filled = self.priority > self.lowest
        r, c = ((top >= self.n) & filled).nonzero(as_tuple=True)
        ev = cand_event[r, top[r, c] - self.n].to(firings.position.device)
        tokens, acts = windows(firings.position[ev], firings.feature[ev])
        self.value[r, c] = firings.value[ev].cpu()
        self.position[r, c] = firings.position[ev].cpu() + position_offset
        self.tokens[r, c] = tokens.cpu()
        self.acts[r, c] = acts.cpu()
        self._clear(~filled)

    def _clear(self, empty: Tensor) -> None:
        """Reset the slots where `empty` [F, n] is True."""
        self.priority[empty] = self.lowest
        self.value[empty] = 0
        self.position[empty] = -1
        self.tokens[empty] = -1
        self.acts[empty] = 0


def histogram_edges(cfg: FeaturesConfig) -> Tensor:
    """float64 [B + 1] log-spaced edges from hist_range[0] to hist_range[1]."""
    lo, hi = (math.log10(v) for v in cfg.hist_range)
    n = max(1, round((hi - lo) * cfg.hist_bins_per_decade))
    return torch.logspace(lo, hi, n + 1, dtype=torch.float64)


class FeatureStats:
    """Every per-feature statistic of one SAE, updated batch by batch (module docstring)."""

    def __init__(
        self,
        d_sae: int,
        vocab_size: int,
        context_size: int,
        cfg: FeaturesConfig,
        explain_tokens: int,
    ):
        self.cfg, self.d_sae, self.T = cfg, d_sae, context_size
        window = cfg.window_before + 1 + cfg.window_after
        self.top = KeptExamples(d_sae, cfg.top_n, window, torch.float64)
        self.sample = KeptExamples(d_sae, cfg.quantile_bins * cfg.per_bin, window, torch.int64)
        self.edges = histogram_edges(cfg)
        self.hist = torch.zeros(d_sae, len(self.edges) - 1, dtype=torch.int64)
        self.fires = torch.zeros(d_sae, dtype=torch.int64)
        self.tokens = 0
        self.scorer = TokenSetScorer(
            d_sae, vocab_size, explain_tokens, cfg.explain_max_set, cfg.explain_candidates
        )

    @torch.no_grad()
    def update(self, ids: Tensor, mask: Tensor, latents: Latents, first_row: int) -> None:
        """One batch: ids int64 [S, T], mask bool [S, T] (scored tokens), latents of the scored
        tokens in row-major order, first_row the global index of row 0."""
        scored_pos = mask.flatten().nonzero().squeeze(1)
        ev = firings_of(latents, scored_pos)
        offset = first_row * self.T
        windows = BatchWindows(ids, ev, self.d_sae, self.cfg.window_before, self.cfg.window_after)
        self.top.merge(ev.value.double(), ev, offset, windows)
        self.sample.merge(
            -event_keys(ev.position + offset, ev.feature, self.cfg.seed), ev, offset, windows
        )
        self._histogram(ev)
        self.tokens += len(scored_pos)
        self.scorer.update(ids.flatten()[scored_pos], ev.scored_index, ev.feature)

    def _histogram(self, ev: Firings) -> None:
        n_bins = self.hist.shape[1]
        lo, hi = math.log10(self.edges[0]), math.log10(self.edges[-1])
        b = ((ev.value.double().log10() - lo) * n_bins / (hi - lo)).floor().long()
        b = b.clamp(0, n_bins - 1).cpu()
        f = ev.feature.cpu()
        self.hist += torch.bincount(f * n_bins + b, minlength=self.hist.numel()).view_as(self.hist)
        self.fires += torch.bincount(f, minlength=self.d_sae)

    def nbytes(self) -> int:
        """Bytes of state held."""
        tensors = [*self.top.tensors(), *self.sample.tensors(), self.hist, self.fires]
        return sum(t.numel() * t.element_size() for t in tensors) + self.scorer.nbytes()

    def quantile_groups(self) -> tuple[Tensor, Tensor]:
        """The sample sorted by ascending activation: (slot order int64 [F, R] into the sample
        tensors, -1 padded at the end; bin int64 [F, R] of each sorted slot, -1 where empty).
        A feature with m <= R sampled firings has its m sorted values cut into `quantile_bins`
        consecutive groups of sizes differing by at most one (larger groups first)."""
        filled = self.sample.position >= 0
        key = torch.where(filled, self.sample.value.double(), math.inf)
        order = key.argsort(dim=1, stable=True)
        m = filled.sum(1, keepdim=True)
        j = torch.arange(order.shape[1])[None, :]
        bins = self.cfg.quantile_bins
        size, extra = m // bins, m % bins
        big = extra * (size + 1)
        group = torch.where(
            j < big, j // (size + 1).clamp_min(1), extra + (j - big) // size.clamp_min(1)
        )
        valid = j < m
        return order.masked_fill(~valid, -1), group.masked_fill(~valid, -1)


# --------------------------------------------------------------------------- logit lens


@dataclass
class LogitLens:
    """Most promoted / suppressed tokens of each decoder row: ids int64 and logit effects
    float32 [F, k], promoted descending, suppressed ascending."""

    top_ids: Tensor
    top_values: Tensor
    bottom_ids: Tensor
    bottom_values: Tensor


@torch.no_grad()
def logit_lens(W_dec: Tensor, gain: Tensor, W_U: Tensor, k: int, chunk: int = 256) -> LogitLens:
    """W_dec [F, d] (each row a feature direction), gain [d] (final norm weight), W_U [V, d]
    -> the k largest and smallest entries of (W_dec * gain) @ W_U^T per row, `chunk` rows at a
    time (memory chunk x V float32)."""
    W_U = W_U.float()
    out: list[list[Tensor]] = [[], [], [], []]
    for rows in (W_dec.float() * gain.float()).split(chunk):
        logits = rows @ W_U.T
        hi, lo = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        for acc, t in zip(out, (hi.indices, hi.values, lo.indices, lo.values)):
            acc.append(t.cpu())
    return LogitLens(*(torch.cat(t) for t in out))


def final_norm_gain(model: nn.Module) -> Tensor:
    """The final norm's weight [d_model] (the RMSNorm gain before the LM head)."""
    gain = final_norm(model).weight
    assert isinstance(gain, Tensor)  # a Parameter
    return gain.detach()


# ------------------------------------------------------------------------ the streaming pass


@torch.no_grad()
def collect(
    model: nn.Module,
    saes: dict[Hookpoint, SparseAutoencoder],
    stats: dict[Hookpoint, FeatureStats],
    batches: Iterator[TokenBatch],
    n_tokens: int,
    device: torch.device,
    outlier_factor: float | None,
) -> int:
    """Stream `batches` through the model (stopping after the last layer needed) and every SAE,
    updating `stats` at the positions the token policy keeps (a fresh `PositionFilter` with
    `outlier_factor` over the suite's hookpoints, as in evaluation). Returns the number of LM
    tokens (all positions) read."""
    rows = lm_tokens = 0
    policy = PositionFilter([hp.name for hp in saes], outlier_factor)
    with tqdm(total=n_tokens, desc="features", unit="tok") as bar:
        for batch in batches:
            ids, mask = batch.input_ids.to(device), batch.train_mask.to(device)
            acts = capture(model, list(saes), ids, stop_early=True)
            keep = policy.keep_positions(acts, mask)
            for hp, sae in saes.items():
                latents = sae.encode(acts[hp][keep].to(sae.W_dec.dtype))
                stats[hp].update(ids, keep, latents, rows)
            rows += ids.shape[0]
            lm_tokens += ids.numel()
            bar.update(int(mask.sum()))
    return lm_tokens


# ------------------------------------------------------------------------------ the run


@dataclass
class HookpointFeatures:
    """What the report needs of one SAE."""

    hookpoint: str
    folder: str
    stats: FeatureStats
    lens: LogitLens
    scores: TokenSetScores
    summary: dict[str, Any]
    llm_explanations: dict[int, str]
