"""Hookpoints `layers.{i}.{site}`: resolution to modules, capture, splice and early exit.

One table row per architecture family says where the decoder layers live and which sub-module
each site names (DESIGN.md section 4). Capturing and splicing share one mechanism: a forward
hook that hands the module's output activation to a function which may return a replacement.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from sae_dist.errors import ConfigError

SITES = ("resid", "mlp", "attn")
"""Hookpoint sites: decoder layer output, MLP output, self-attention output (after o_proj)."""


@dataclass(frozen=True)
class Family:
    """Where a model family keeps what the hookpoints and the logit lens need."""

    layers: str
    """Path of the decoder layer list, e.g. `model.layers`."""
    sites: dict[str, str]
    """Site -> sub-module path inside a decoder layer ("" = the layer itself)."""
    final_norm: str
    """Path of the norm applied to the last residual stream before the LM head."""
    unembed: str = "lm_head"
    """Path of the LM head (the unembedding)."""


_LLAMA_LIKE = Family("model.layers", {"resid": "", "mlp": "mlp", "attn": "self_attn"}, "model.norm")
FAMILIES: dict[str, Family] = dict.fromkeys(
    ("llama", "qwen2", "qwen3", "mistral", "olmo2"), _LLAMA_LIKE
)
"""HF `model_type` -> its row; a new family (e.g. Gemma, with extra post-norms) is one row."""

_TL_HOOKS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}

HookFn = Callable[[torch.Tensor], torch.Tensor | None]
"""Receives a hookpoint's activation [batch, seq, d_model]; a returned tensor replaces it."""

_NAME = re.compile(r"^layers\.(\d+)\.(\w+)$")
_TL_SITES = {hook: site for site, hook in _TL_HOOKS.items()}
_TL_NAME = re.compile(rf"^blocks\.(\d+)\.({'|'.join(_TL_SITES)})$")


@dataclass(frozen=True, order=True)
class Hookpoint:
    layer: int
    site: str

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.site}"

    def __str__(self) -> str:
        return self.name

    @property
    def saelens_hook_name(self) -> str:
        """The TransformerLens name of the same activation, which SAELens metadata uses."""
        return f"blocks.{self.layer}.{_TL_HOOKS[self.site]}"

    @classmethod
    def from_saelens_hook_name(cls, name: str) -> Hookpoint | None:
        """Inverse of `saelens_hook_name` (blocks.{i}.hook_resid_post / hook_mlp_out /
        hook_attn_out); None for any other name."""
        m = _TL_NAME.match(name)
        return cls(int(m.group(1)), _TL_SITES[m.group(2)]) if m else None

    @classmethod
    def parse(
        cls, name: str, n_layers: int | None = None, key: str = "sites.hookpoints"
    ) -> Hookpoint:
        """Parse `layers.{i}.{site}` and check it (against `n_layers` when given); errors
        name `key` and list the valid hookpoints."""
        m = _NAME.match(name)
        layers = "i" if n_layers is None else f"0..{n_layers - 1}"
        valid = f"layers.{{{layers}}}.{{{','.join(SITES)}}}"
        if not m:
            raise ConfigError(key, name, valid)
        hp = cls(int(m.group(1)), m.group(2))
        if hp.site not in SITES or n_layers is not None and not 0 <= hp.layer < n_layers:
            raise ConfigError(key, name, valid)
        return hp

    @property
    def site_order(self) -> tuple[int, int]:
        """Sort key: layer, then site in SITES order."""
        return self.layer, SITES.index(self.site)


class SiteGrid(Protocol):
    """A layer x site grid or an explicit hookpoint list (sae_dist.config.SitesConfig)."""

    @property
    def layers(self) -> Sequence[int] | None: ...
    @property
    def sites(self) -> Sequence[str]: ...
    @property
    def hookpoints(self) -> Sequence[str] | None: ...


def grid_hookpoints(cfg: SiteGrid, n_layers: int) -> list[Hookpoint]:
    """The hookpoints of a sites config, sorted by layer then site order; validated."""
    if cfg.hookpoints:
        hps = [Hookpoint.parse(name, n_layers) for name in cfg.hookpoints]
    else:
        layers = list(range(n_layers)) if cfg.layers is None else list(cfg.layers)
        for layer in layers:
            if not 0 <= layer < n_layers:
                raise ConfigError(
                    "sites.layers", layer, f"0..{n_layers - 1} (model has {n_layers} layers)"
                )
        for site in cfg.sites:
            if site not in SITES:
                raise ConfigError("sites.sites", site, ", ".join(SITES))
        hps = [Hookpoint(layer, site) for layer in layers for site in cfg.sites]
    if not hps:
        raise ConfigError("sites", "empty grid", "at least one hookpoint")
    if len(set(hps)) != len(hps):
        raise ConfigError("sites", [h.name for h in hps], "each hookpoint at most once")
    return sorted(hps, key=lambda h: h.site_order)


def family_of(model: nn.Module) -> str:
    model_type = getattr(model.config, "model_type", "")
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} has no hookpoint table; known: "
            f"{sorted(FAMILIES)} (add a row to sae_dist.hookpoints.FAMILIES)"
        )
    return model_type


def family(model: nn.Module) -> Family:
    return FAMILIES[family_of(model)]


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers (`model.model` for Llama/Qwen families); calling
    it runs embeddings, layers and the final norm, without the LM head."""
    return model.get_submodule(family(model).layers.rsplit(".", 1)[0])


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last residual stream before the LM head."""
    return model.get_submodule(family(model).final_norm)


def unembedding(model: nn.Module) -> nn.Linear:
    """The LM head."""
    head = model.get_submodule(family(model).unembed)
    assert isinstance(head, nn.Linear)  # every family's LM head is a Linear
    return head


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = model.get_submodule(family(model).layers)
    assert isinstance(layers, nn.ModuleList)  # every family's decoder layers are a ModuleList
    return layers


def resolve(model: nn.Module, hp: Hookpoint) -> nn.Module:
    """The module whose output is the hookpoint's activation."""
    layers = decoder_layers(model)
    if not 0 <= hp.layer < len(layers):
        raise ConfigError("hookpoint", hp.name, f"layers 0..{len(layers) - 1}")
    sub = family(model).sites[hp.site]
    return layers[hp.layer].get_submodule(sub) if sub else layers[hp.layer]


class StopForward(Exception):
    """Raised by the early-exit hook once every needed layer has run."""


def _output_hook(fn: HookFn):
    """Forward hook applying `fn` to the activation (first element when the output is a tuple)."""

    def hook(module: nn.Module, args, output):
        act = output[0] if isinstance(output, tuple) else output
        new = fn(act)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


@contextlib.contextmanager
def hooks(
    model: nn.Module, fns: dict[Hookpoint, HookFn], stop_after: bool = False
) -> Iterator[None]:
    """Attach `fns` at their hookpoints for the duration of the block. With `stop_after`, the
    forward pass raises StopForward right after the last layer any hookpoint needs; use
    `run_forward` to swallow it."""
    handles = [resolve(model, hp).register_forward_hook(_output_hook(fn)) for hp, fn in fns.items()]
    if stop_after:
        last = decoder_layers(model)[max(hp.layer for hp in fns)]
        handles.append(last.register_forward_hook(_raise_stop))  # runs after the capture hooks
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _raise_stop(module: nn.Module, args, output) -> None:
    raise StopForward


def run_forward(model: nn.Module, input_ids: torch.Tensor, **kwargs):
    """Call the model; returns its output, or None when an early-exit hook stopped it."""
    try:
        return model(input_ids=input_ids, use_cache=False, **kwargs)
    except StopForward:
        return None


def capture(
    model: nn.Module,
    hookpoints: list[Hookpoint],
    input_ids: torch.Tensor,
    stop_early: bool = True,
    **forward_kwargs,
) -> dict[Hookpoint, torch.Tensor]:
    """Activations [batch, seq, d_model] at each hookpoint for one forward pass (no grad),
    stopping after the last layer needed when `stop_early`; `forward_kwargs` (e.g. the
    attention_mask of a padded batch) go to the model."""
    acts: dict[Hookpoint, torch.Tensor] = {}

    def store(hp: Hookpoint) -> HookFn:
        def fn(act: torch.Tensor) -> None:
            acts[hp] = act.detach()

        return fn

    with torch.no_grad(), hooks(model, {hp: store(hp) for hp in hookpoints}, stop_early):
        run_forward(model, input_ids, **forward_kwargs)
    return acts


def splice(model: nn.Module, replacements: dict[Hookpoint, HookFn]):
    """Context manager replacing each hookpoint's activation by `fn(activation)` for every
    forward pass in the block (e.g. the SAE reconstruction, or zeros)."""
    return hooks(model, replacements, stop_after=False)


# --- where the current forward pass sits in the sequence (for position-selective hooks) -----


@dataclass
class ForwardPositions:
    """Where the tokens of the forward pass in progress sit, updated before every pass.

    Under `generate` with a KV cache the first pass covers the prompt and each later pass one new
    token; without a cache every pass covers the whole sequence so far. Absolute position p of a
    row (counting pad tokens) is `start + t` for the pass's t-th token."""

    start: int = 0
    """Absolute position of the pass's first token: the length of the KV cache before it."""
    valid: torch.Tensor | None = None
    """bool [B, T]: the pass's tokens that are not padding (from the 2-D attention mask; None
    when the pass has no such mask: every token counts)."""


@contextlib.contextmanager
def track_positions(model: nn.Module) -> Iterator[ForwardPositions]:
    """Yield a ForwardPositions that a pre-hook on the decoder stack refreshes before every
    forward pass in the block, from the pass's cache length and 2-D attention mask."""
    pos = ForwardPositions()

    def pre(module: nn.Module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        seq = (ids if ids is not None else embeds).shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        pos.start = int(cache.get_seq_length()) if cache is not None else 0
        mask = kwargs.get("attention_mask")
        pos.valid = mask[:, -seq:].bool() if mask is not None and mask.dim() == 2 else None

    handle = decoder_stack(model).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield pos
    finally:
        handle.remove()
