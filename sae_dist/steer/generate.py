"""Greedy generation under interventions: prompts rendered with the chat template, left-padded
into one batch, generated with the KV cache; the same tokens as one prompt at a time. Gates
(the interventions' own and any extra ones) read each prompt once, on the prompt pass; their
scores and decisions come back with each generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_dist.steer.gate import Gate
from sae_dist.steer.interventions import Intervention, steer


@dataclass
class Generation:
    """One greedy completion."""

    prompt: str
    text: str
    """The completion decoded without special tokens."""
    tokens: list[int]
    """Generated token ids, cut after the first EOS (excluded)."""
    prompt_tokens: list[int]
    """The rendered prompt's token ids (no padding)."""
    gate_scores: list[float] = field(default_factory=list)
    """Reduced score of each gate read (`Steering.gates` order: the interventions' gates, then
    the extra `gates`)."""
    gate_open: list[bool] = field(default_factory=list)
    """Each gate's decision for this prompt."""


def render_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as one user turn in the model's chat template, with the
    assistant header appended (the template's default system prompt included)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
        )
        for p in prompts
    ]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids int64 [B, T], attention_mask int64 [B, T]) with rows left-padded to T."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.int64)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    eos = cast(Any, model).generation_config.eos_token_id  # nn.Module's stubs: Tensor | Module
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    ids.discard(None)
    return ids


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 48,
    batch_size: int = 32,
    use_cache: bool = True,
    desc: str = "generate",
    gates: Sequence[Gate] = (),
) -> list[Generation]:
    """Greedy completions of each prompt (one user turn) under `interventions`, in batches of
    `batch_size` left-padded prompts of similar length; results in the order of `prompts`.
    `gates` are read (not acted on) besides the interventions' own."""
    rendered = render_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(rendered[i]))
    out: list[Generation | None] = [None] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        ids, mask = left_pad([rendered[i] for i in batch], pad)
        ids, mask = ids.to(device), mask.to(device)
        with steer(model, interventions, prompt_len=ids.shape[1], gates=gates) as steering:
            seqs = cast(Any, model).generate(  # a transformers model; nn.Module's stubs lack it
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                use_cache=use_cache,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        readings = steering.prompt_readings()
        for row, i in enumerate(batch):
            new = seqs[row, ids.shape[1] :].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos), len(new))
            out[i] = Generation(
                prompts[i],
                tokenizer.decode(new[:cut], skip_special_tokens=True),
                new[:cut],
                rendered[i],
                [float(r.scores[row]) for r in readings],
                [bool(r.open[row]) for r in readings],
            )
    return out  # type: ignore[return-value]
