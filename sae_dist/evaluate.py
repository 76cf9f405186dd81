"""Evaluation of SAEs on held-out tokens (DESIGN.md section 8).

`python -m sae_dist.evaluate suite=<path> [model=<name>] [eval.tokens=<int>] out_dir=<path>`
(conf/eval.yaml) evaluates a suite directory, one SAE folder, or a folder of SAE folders on the
held-out split of the data config (every `holdout_every`-th document, never trained on).

Token sets: the token policy of training (`data.policy`, DESIGN.md section 5). The position set
is the train_mask (special tokens and BOS never in it); of it, reconstruction metrics use the
positions the policy's outlier filter keeps (sae_dist.policy, the producer's own rule), and
splices (SAE reconstruction, zeros, mean) replace the activation at exactly those positions; the
positions left out keep their clean activation and are counted (`excluded`). CE and KL count
position t iff train_mask[t] is True and t + 1 is in the row, with target input_ids[t + 1]; the
same positions for every CE and the KL. `eval.all_tokens` adds every metric over the whole
position set (`<metric>_all`).

Metrics, accumulated in float64 over those tokens:
- fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, explained_variance = 1 - fvu,
  mse = mean_tokens ||x - x_hat||^2 / d_in, cosine = mean_tokens cos(x, x_hat),
  l0 = mean_tokens #active latents, dead_frac = latents never active, dense_frac = latents active
  on more than 10% of tokens, dense_l0 = the part of l0 those dense latents carry, and a
  histogram of log10 latent frequencies;
- ce_clean, ce_spliced, ce_zero (ce_mean with eval.ce_mean), delta_loss = ce_spliced - ce_clean
  with delta_loss_se, its standard error over sequences (`ModelLevelAccumulator`),
  loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean),
  kl = mean_tokens KL(p_clean || p_spliced).

Efficiency: the cheapest correct scheme found (implemented in `sae_dist.metrics`; figures for
SmolLM2-135M-Instruct in bf16 with 12 TopK SAEs at layers 6/12/18/24 x resid/mlp/attn, batches
of 16 x 256 tokens, on a 2-core CPU; benchmarks/README.md, "Suite evaluation"):
1. One clean pass per batch (the decoder stack, no LM head) gives every SAE's input
   activations, ce_clean, and caches the hidden state entering each layer an SAE sits at, with
   the keyword arguments the model hands each decoder layer.
2. A splice at layer L changes nothing before L, so each spliced or ablated pass (SAE, zero,
   optional mean) replays only layers L..N-1 from the cache, then the final norm and the LM
   head. Passes that start at the same layer run as one batch of up to `max_variants` on an
   accelerator; on CPU a replay holds at most `max_batch_tokens` positions (one 16-sequence
   batch: six variants one by one took 12.5 s, as one batch 16.7 s).
3. The LM head runs only at the CE positions, `logit_chunk` rows at a time, in the model's
   dtype (the logits z the model itself computes); the clean logits and probs are computed once
   per batch and reused by every variant.
4. After the head no log-softmax is materialised and nothing of size vocab is float64:
   CE = logsumexp(z) - z[target] (sum of exp in float32, log and add in float64) and
   KL(p_clean || p) = <p_clean, z_clean - z> + (lse - lse_clean) * sum(p_clean), which is
   sum p_clean (log p_clean - log p) regrouped; float32 differences of bf16 logits are exact,
   and an identity splice gives kl = delta_loss = 0 exactly (checked on SmolLM2 in bf16). On
   CPU this work runs on slices of about 1M logits that stay in cache: fresh [256, vocab]
   float32 temporaries cost page faults and memory traffic comparable to the head matmul.
   Per CE position and variant: head matmul 0.15 ms, with CE and KL 0.21 ms (2 threads), where
   the previous float32 log-softmax + softmax + bmm scheme took 0.30 ms and was 10x less
   accurate (max per-position KL error 3e-5 against 3e-6, float64 reference).
Float64 is used only for per-position scalars and the running sums (DESIGN.md section 8).
No autocast: the clean pass and the replays run the same layers in the model's dtype.
Where the time goes per batch (3,849 CE positions, 2 threads, idle machine): replays 60 %,
LM heads + CE/KL 29 % (the head matmuls alone about 20 %), clean pass 5 %, the 12 SAE
encode/decodes 4 %, float64 reconstruction sums 1 %; in all 17 clean HF forwards (it was 21
before items 2 and 4), against about 15.5 for the FLOP floor of this scheme (1 clean pass +
360 replayed layers = 12 layer stacks + 25 LM heads + 12 SAEs). Going lower needs fewer
replayed layers (e.g. starting a resid splice's replay at L + 1 would save about 2 %).
Neither the logit chunk (128-512), the slice size (0.5-2M logits) nor max_batch_tokens
(1024-4096) moves the CPU time beyond the noise.

Outputs under out_dir: saes/<hookpoint>.json (the metrics above plus the latent-frequency
histogram, the SAE, suite, model, data and eval configs, splice and CE positions, token counts),
suite_table.md / suite_table.csv (one row per SAE; Markdown adds layer x site tables),
metrics_by_layer.png, l0_tradeoff.png, latent_frequency.png; metrics and plots also go to W&B.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_dist.checkpoint import CFG_FILE, CheckpointError, load_sae, read_suite_index
from sae_dist.cli import CONF_DIR, run_hydra
from sae_dist.config import (ConfigError, EvalRunConfig, ModelConfig,
                             register_configs)
from sae_dist.data import TokenBatch, TokenStream
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.metrics import (CE_POSITIONS, SPLICE_POSITIONS, ModelLevelAccumulator,
                              NextTokenScorer, ce_positions, clean_pass, masked_edit, replay_from)
from sae_dist.policy import PositionFilter
from sae_dist.sae import Latents, SparseAutoencoder

log = logging.getLogger(__name__)

DENSE_THRESHOLD = 0.1
"""A latent active on more than this fraction of tokens counts as dense."""
HIST_EDGES = [e / 2 for e in range(-14, 1)]
"""Edges of the latent-frequency histogram in log10(fraction of tokens): 1e-7 .. 1 in half
decades; frequencies below 1e-7 (but > 0) fall in the first bin; dead latents are counted apart."""

MAX_BATCH_TOKENS = 4096
"""Default cap on the positions of one evaluation forward batch, and on CPU of one replay batch
(memory of the clean logits and probs: 4096 x vocab x 6 bytes for a bf16 model, 1.2 GB for
SmolLM2, 3.7 GB for Qwen3)."""

Reconstructor = Callable[[Tensor], Tensor]
"""Any x [n, d_in] -> x_hat [n, d_in]; sparsity metrics are None for such a plain function."""
SAELike = Union[SparseAutoencoder, Reconstructor]


def frequency_metrics(freq: Tensor) -> dict[str, float]:
    """From each latent's firing frequency freq [d_sae] (fraction of tokens it is active on):
    dead_frac (fraction of latents never active), dense_frac (fraction active on more than
    DENSE_THRESHOLD of tokens) and dense_l0 (mean number of those dense latents active per
    token, latents per token)."""
    dense = freq > DENSE_THRESHOLD
    return {"dead_frac": float((freq == 0).double().mean()),
            "dense_frac": float(dense.double().mean()), "dense_l0": float(freq[dense].sum())}


def reconstruct(sae: SAELike, x: Tensor) -> tuple[Tensor, Optional[Latents]]:
    """x [n, d_in] float32 -> (x_hat [n, d_in], latents or None for a plain function)."""
    if isinstance(sae, SparseAutoencoder):
        latents = sae.encode(x.to(sae.W_dec.dtype))
        return sae.decode(latents), latents
    return sae(x), None


@dataclass
class ReconstructionAccumulator:
    """Running float64 sums for one SAE; `update` per batch, `result` at the end. Sums of x are
    taken around a shift (the first batch's mean) so the variance does not cancel."""

    d_in: int
    d_sae: Optional[int] = None
    n: int = 0
    sum_sq_err: float = 0.0
    sum_cos: float = 0.0
    sum_l0: float = 0.0
    shift: Optional[Tensor] = None
    sum_dx: Tensor = field(init=False)
    sum_sq_dx: float = 0.0
    fire_counts: Optional[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.sum_dx = torch.zeros(self.d_in, dtype=torch.float64)
        self.fire_counts = None if self.d_sae is None else torch.zeros(self.d_sae,
                                                                       dtype=torch.int64)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, latents: Optional[Latents] = None) -> None:
        """x, x_hat [n, d_in] for the tokens that pass the train mask; latents of those tokens."""
        if x.shape[0] == 0:
            return
        x64, x_hat64 = x.double(), x_hat.double()
        if self.shift is None:
            self.shift = x64.mean(0).cpu()
        dx = x64 - self.shift.to(x64.device)
        self.n += x.shape[0]
        self.sum_sq_err += float((x64 - x_hat64).pow(2).sum())
        self.sum_dx += dx.sum(0).cpu()
        self.sum_sq_dx += float(dx.pow(2).sum())
        self.sum_cos += float(nn.functional.cosine_similarity(x64, x_hat64, dim=1).sum())
        if latents is not None and self.fire_counts is not None:
            self.sum_l0 += float(latents.l0().double().sum())
            self.fire_counts += latents.fire_counts().cpu()

    def frequency_histogram(self) -> Optional[dict[str, Any]]:
        """{"log10_freq_edges", "counts" (latents per bin), "dead"} or None without latents."""
        if self.fire_counts is None:
            return None
        freq = self.fire_counts.double() / self.n
        alive = freq[freq > 0].log10().clamp(HIST_EDGES[0], HIST_EDGES[-1])
        counts = torch.histogram(alive, torch.tensor(HIST_EDGES, dtype=torch.float64)).hist
        return {"log10_freq_edges": HIST_EDGES, "counts": [int(c) for c in counts],
                "dead": int((freq == 0).sum())}

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError("no evaluation tokens passed the mask")
        mean_dx = self.sum_dx / self.n
        total_var = self.sum_sq_dx - self.n * float(mean_dx.pow(2).sum())
        fvu = self.sum_sq_err / total_var if total_var > 0 else math.nan
        out: dict[str, Any] = {"fvu": fvu, "explained_variance": 1 - fvu,
                               "mse": self.sum_sq_err / self.n / self.d_in,
                               "cosine": self.sum_cos / self.n,
                               "l0": None, "dead_frac": None, "dense_frac": None, "dense_l0": None,
                               "tokens": self.n}
        if self.fire_counts is not None:
            out.update(l0=self.sum_l0 / self.n,
                       **frequency_metrics(self.fire_counts.double() / self.n))
        return out


def take_batches(stream: TokenStream, n_tokens: int, n_seqs: int) -> list[TokenBatch]:
    """Whole batches of `n_seqs` rows until at least `n_tokens` tokens pass the train mask."""
    batches, seen = [], 0
    for batch in stream.batches(n_seqs):
        batches.append(batch)
        seen += int(batch.train_mask.sum())
        if seen >= n_tokens:
            break
    if seen < n_tokens:
        log.warning("held-out data ran out after %d of %d tokens", seen, n_tokens)
    return batches


@torch.no_grad()
def mean_activations(model: nn.Module, hookpoints: list[Hookpoint], batches: Sequence[TokenBatch],
                     device: torch.device, outlier_factor: Optional[float]
                     ) -> dict[Hookpoint, Tensor]:
    """Mean activation [d_model] (float64) of each hookpoint over the positions the token policy
    keeps in `batches` (a fresh `PositionFilter`, so the same positions as `evaluate_saes`; one
    extra pass, stopped after the last layer needed)."""
    sums: dict[Hookpoint, Tensor] = {}
    n = 0
    policy = PositionFilter([hp.name for hp in hookpoints], outlier_factor)
    for batch in batches:
        mask = batch.train_mask.to(device)
        acts = capture(model, hookpoints, batch.input_ids.to(device), stop_early=True)
        keep = policy.keep_positions(acts, mask)
        for hp in hookpoints:
            s = acts[hp][keep].double().sum(0)
            sums[hp] = sums[hp] + s if hp in sums else s
        n += int(keep.sum())
    return {hp: s / n for hp, s in sums.items()}


def split_batches(batches: Sequence[TokenBatch], max_tokens: int) -> list[TokenBatch]:
    """The same rows, in the same order, in batches of at most max(1, max_tokens // T) rows."""
    out = []
    for b in batches:
        rows = max(1, max_tokens // b.input_ids.shape[1])
        out += [TokenBatch(i, m) for i, m in zip(b.input_ids.split(rows),
                                                  b.train_mask.split(rows))]
    return out


@dataclass
class _View:
    """The sums of one token set: the positions the policy keeps (suffix ""), or every
    position of the position set (the all-token figures, suffix "_all", no ce_mean)."""

    every_position: bool
    recon: dict[Hookpoint, ReconstructionAccumulator]
    ce: dict[Hookpoint, ModelLevelAccumulator]

    @property
    def suffix(self) -> str:
        return "_all" if self.every_position else ""


@torch.no_grad()
def evaluate_saes(model: nn.Module, saes: dict[Hookpoint, SAELike], batches: Sequence[TokenBatch],
                  device: torch.device, *, outlier_factor: Optional[float],
                  model_level: bool = True, ce_mean: bool = False,
                  max_variants: int = 8, logit_chunk: int = 256,
                  max_batch_tokens: int = MAX_BATCH_TOKENS,
                  all_tokens: bool = False) -> dict[str, dict[str, Any]]:
    """Reconstruction (and with `model_level` the model-level) metrics of every SAE over the
    held-out `batches`; keyed by hookpoint name, in the order of `saes`. An SAE may be a plain
    function x [n, d] -> x_hat [n, d] (sparsity metrics are then None). Batches are split to at
    most `max_batch_tokens` positions per forward (the clean logits and float32 probs of a
    batch, positions x vocab each, are held in memory); on CPU a replay batch holds at most
    that many positions too (the module docstring gives the scheme).

    Token policy: of each batch's position set (train_mask) the positions a fresh
    `PositionFilter(outlier_factor)` over the evaluated hookpoints keeps (`outlier_factor` is
    required, normally `data.policy.outlier_factor`; None keeps every finite position) are
    reconstructed and spliced, the others keep their clean activation; `excluded` counts the
    positions left out.
    CE and KL are scored at the position set's CE positions. `all_tokens` adds every metric
    over the whole position set (no outlier left out) as `<metric>_all` (without ce_mean).
    Besides the scalars: `latent_freq_hist`, and with `model_level` `delta_loss_by_sequence`
    (`ModelLevelAccumulator.by_sequence`, for paired comparisons of SAEs on the same batches)."""
    hps = list(saes)
    batches = split_batches(batches, max_batch_tokens)

    views = [_View(every, {hp: ReconstructionAccumulator(_d_in(sae, model),
                                                        getattr(sae, "d_sae", None))
                           for hp, sae in saes.items()},
                   {hp: ModelLevelAccumulator() for hp in hps})
             for every in ([False, True] if all_tokens else [False])]
    policy = PositionFilter([hp.name for hp in hps], outlier_factor)
    means = (mean_activations(model, hps, batches, device, outlier_factor)
             if model_level and ce_mean else {})
    excluded = 0
    for batch in tqdm(batches, desc="eval", unit="batch", leave=False):
        ids, mask = batch.input_ids.to(device), batch.train_mask.to(device)
        if model_level:
            clean = clean_pass(model, ids, hps, sorted({hp.layer for hp in hps}))
            acts = clean.acts
            sel, targets = ce_positions(ids, mask)
            scorer = NextTokenScorer(model, clean.final, sel, targets, logit_chunk)
        else:
            acts = capture(model, hps, ids, stop_early=True)
        keep = policy.keep_positions(acts, mask)
        excluded += int(mask.sum() - keep.sum())
        for v in views:
            positions = mask if v.every_position else keep
            x_hats = {}
            for hp, sae in saes.items():
                x = acts[hp][positions].float()
                x_hats[hp], latents = reconstruct(sae, x)
                v.recon[hp].update(x, x_hats[hp], latents)
            if model_level:
                _model_level_batch(model, clean, scorer, positions, x_hats,
                                   {} if v.every_position else means, v.ce, max_variants,
                                   max_batch_tokens)
    results = {}
    for hp in hps:
        res: dict[str, Any] = {}
        for v in views:
            part = v.recon[hp].result()
            if model_level:
                part.update(v.ce[hp].result())
            res.update({f"{k}{v.suffix}": val for k, val in part.items()})
        res["excluded"] = excluded
        res["latent_freq_hist"] = views[0].recon[hp].frequency_histogram()
        if model_level:
            res["delta_loss_by_sequence"] = views[0].ce[hp].by_sequence()
        results[hp.name] = res
    return results


def _d_in(sae: SAELike, model: nn.Module) -> int:
    return sae.d_in if isinstance(sae, SparseAutoencoder) else model.config.hidden_size


def _model_level_batch(model: nn.Module, clean, scorer: NextTokenScorer, splice: Tensor,
                       x_hats: dict[Hookpoint, Tensor], means: dict[Hookpoint, Tensor],
                       acc: dict[Hookpoint, ModelLevelAccumulator], max_variants: int,
                       max_batch_tokens: int = MAX_BATCH_TOKENS) -> None:
    """Score one batch: clean CE, then per start layer the SAE / zero / mean splices at the
    positions `splice` [B, T] of every hookpoint of that layer, batched `max_variants` at a
    time (on CPU also at most `max_batch_tokens` positions per replay: larger batches are
    slower per token there)."""
    variants: dict[int, list[tuple[Hookpoint, str, Any]]] = {}
    d_model = model.config.hidden_size
    per_replay = max_variants if splice.device.type != "cpu" else max(1, min(
        max_variants, max_batch_tokens // splice.numel()))
    rows = scorer.sel.nonzero(as_tuple=True)[0]
    for hp, x_hat in x_hats.items():
        acc[hp].add_clean(scorer.ce_clean, rows)
        kinds = [("spliced", x_hat), ("zero", x_hat.new_zeros(d_model))]
        kinds += [("mean", means[hp])] if hp in means else []
        variants.setdefault(hp.layer, []).extend((hp, k, masked_edit(splice, v))
                                                 for k, v in kinds)
    for layer, vs in sorted(variants.items()):
        for i in range(0, len(vs), per_replay):
            group = vs[i:i + per_replay]
            finals = replay_from(model, clean, layer, [{hp: edit} for hp, _, edit in group])
            for (hp, kind, _), final in zip(group, finals):
                ce, kl = scorer.score(final, with_kl=kind == "spliced")
                acc[hp].add(kind, ce, kl)


def eval_context(suite: str, model: ModelConfig, data: Any, batches: Sequence[TokenBatch],
                 **extra: Any) -> dict[str, Any]:
    """What a per-SAE JSON records besides the metrics: suite, model and data configs, split,
    the token policy (named), splice and CE positions, and the sequences and tokens the
    evaluation read."""
    return {"suite": suite, "model": asdict(model), "data": asdict(data), "split": "eval",
            "token_policy": data.policy.describe(),
            "splice_positions": SPLICE_POSITIONS, "ce_positions": CE_POSITIONS,
            "sequences": sum(len(b.input_ids) for b in batches),
            "lm_tokens": sum(b.input_ids.numel() for b in batches), **extra}


def scalar_metrics(res: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of one SAE's results (drops the frequency histogram)."""
    return {k: v for k, v in res.items() if not isinstance(v, (dict, list))}


# ------------------------------------------------------------------------- loading a suite

def discover_saes(path: Path) -> tuple[dict[str, Path], Optional[str]]:
    """{hookpoint name: SAE folder} of a suite dir (suite.json), one SAE folder (cfg.json) or a
    folder of SAE folders, and the model name the suite or the SAEs' metadata give (or None)."""
    path = Path(path)
    if (path / "suite.json").is_file():
        index = read_suite_index(path)
        return {e["hookpoint"]: path / e["path"] for e in index["saes"]}, index.get("model")
    folders = [path] if (path / CFG_FILE).is_file() else sorted(
        p for p in path.glob("*") if (p / CFG_FILE).is_file())
    if not folders:
        raise ConfigError("suite", str(path), "a suite directory (suite.json), an SAE folder "
                          "(cfg.json + sae_weights.safetensors) or a folder of SAE folders")
    found: dict[str, Path] = {}
    model = None
    for folder in folders:
        meta = json.loads((folder / CFG_FILE).read_text()).get("metadata", {})
        name = hookpoint_name(meta, folder)
        if name in found:
            raise ConfigError("suite", str(path), f"one SAE per hookpoint ({name} appears in "
                              f"{found[name]} and {folder}); evaluate them separately")
        found[name] = folder
        model = model or meta.get("model_name")
    return found, model


def hookpoint_name(metadata: dict[str, Any], folder: Path) -> str:
    """`layers.{i}.{site}` from our metadata, from a TransformerLens `hook_name`
    (blocks.{i}.hook_resid_post / hook_mlp_out / hook_attn_out), or from the folder name."""
    if "hookpoint" in metadata:
        return metadata["hookpoint"]
    hp = Hookpoint.from_saelens_hook_name(str(metadata.get("hook_name", "")))
    return hp.name if hp is not None else folder.name


def model_config_for(name: str) -> ModelConfig:
    """The conf/model/*.yaml whose file stem, `name` or `path` equals `name`."""
    known = []
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        raw = OmegaConf.load(path)
        known.append(path.stem)
        if name in (path.stem, raw.get("name"), raw.get("path")):
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
    raise ConfigError("model", name, f"model=<name> with one of {', '.join(known)} (the suite "
                      "names a model that has no conf/model/ entry)")


def validate_eval(cfg: EvalRunConfig) -> None:
    e = cfg.eval
    for key, value in (("eval.tokens", e.tokens), ("eval.batch_seqs", e.batch_seqs),
                       ("eval.max_variants", e.max_variants), ("eval.logit_chunk", e.logit_chunk)):
        if value < 1:
            raise ConfigError(key, value, ">= 1")
    if e.device not in ("auto", "cpu", "cuda") and not e.device.startswith("cuda:"):
        raise ConfigError("eval.device", e.device, "auto, cpu, cuda, cuda:<i>")
    if not Path(cfg.suite).exists():
        raise ConfigError("suite", cfg.suite, "an existing suite directory or SAE folder")


# ---------------------------------------------------------------------------------- the run

def run_evaluation(cfg: EvalRunConfig) -> dict[str, dict[str, Any]]:
    """Load the suite and the model, evaluate, write JSONs / tables / plots and log to W&B."""
    from sae_dist.models import load_model
    from sae_dist.report import EVAL_METRICS, write_eval_outputs
    from sae_dist.tracking import RunLogger

    validate_eval(cfg)
    folders, suite_model = discover_saes(Path(cfg.suite))
    if cfg.model is None:
        if not suite_model:
            raise ConfigError("model", None, "model=<name>: the suite does not name its model")
        cfg.model = model_config_for(suite_model)
    device = torch.device(cfg.eval.device if cfg.eval.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    saes, sae_info = {}, {}
    for name, folder in folders.items():
        hp = Hookpoint.parse(name, cfg.model.n_layers)
        sae, sae_cfg = load_sae(folder, device)
        if sae.d_in != cfg.model.d_model:
            raise CheckpointError(f"{folder}: d_in={sae.d_in} but {cfg.model.name} has "
                                  f"d_model={cfg.model.d_model}")
        saes[hp] = sae.eval()
        sae_info[hp.name] = {"path": str(folder), **{k: sae_cfg.get(k) for k in (
            "architecture", "d_in", "d_sae", "k")}}
    model, tokenizer = load_model(cfg.model, device)
    batches = take_batches(TokenStream(cfg.data, tokenizer, "eval", seed=cfg.eval.seed),
                           cfg.eval.tokens, cfg.eval.batch_seqs)
    start = time.perf_counter()
    results = evaluate_saes(model, saes, batches, device,
                            outlier_factor=cfg.data.policy.outlier_factor,
                            model_level=cfg.eval.model_level, ce_mean=cfg.eval.ce_mean,
                            max_variants=cfg.eval.max_variants, logit_chunk=cfg.eval.logit_chunk,
                            all_tokens=cfg.eval.all_tokens)
    seconds = time.perf_counter() - start
    context = eval_context(str(cfg.suite), cfg.model, cfg.data, batches, eval=asdict(cfg.eval),
                           seconds=seconds)
    out_dir = Path(cfg.out_dir)
    files = write_eval_outputs(results, out_dir, context, sae_info)
    logger = RunLogger(cfg.logger, out_dir, asdict(cfg), name=f"eval-{Path(cfg.suite).name}")
    flat = {f"{hp}/{k}": v for hp, r in results.items() for k, v in scalar_metrics(r).items()
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))}
    logger.log(flat, step=0)
    logger.summary(flat)
    logger.log_images({f"eval/{p.stem}": p for p in files["plots"]})
    logger.log_table("eval/results", {hp: scalar_metrics(r) for hp, r in results.items()},
                     EVAL_METRICS)
    logger.finish()
    print(f"\n{files['table_md'].read_text()}\nEvaluated {len(saes)} SAEs on "
          f"{results[next(iter(results))]['tokens']} held-out tokens in {seconds:.1f} s; "
          f"outputs in {out_dir}\nW&B run: {logger.location}")
    return results


register_configs()


def main() -> None:
    """`python -m sae_dist.evaluate` / `sae-evaluate` (sae_dist.cli: overrides, --help, errors)."""
    run_hydra("eval", EvalRunConfig, run_evaluation)


if __name__ == "__main__":
    main()
