"""Capability cost as deployed: next-token loss on the replies of held-out harmless chats with an
intervention applied as `generate` applies it (DESIGN.md section 9).

Each chat is one user turn and the assistant's reply. The prompt is the user turn rendered as
`generate` renders it (chat template, assistant header); the reply's content tokens (at most
`max_reply_tokens`) sit where generated tokens would, so `positions=generated` and gates act as
in generation. Batches are the prompts left-padded to one length P followed by the replies
right-padded, with position ids counted over non-pad tokens. The prompt pass runs first (it
decides the gates) and the replies follow on its KV cache, as in generation. Loss: the mean NLL
(nats) of each reply token given everything before it; per chat sums are kept so the loss of a
gated intervention can be composed from its open and closed chats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sae_dist.steer.gate import Gate
from sae_dist.steer.generate import render_prompts
from sae_dist.steer.interventions import Intervention, steer


@dataclass
class ProbeResult:
    """Per chat: NLL sums and token counts, and each gate's reading on its prompt."""

    nll: Tensor
    """float64 [n_chats]: summed NLL of the reply tokens (nats)."""
    count: Tensor
    """int64 [n_chats]: reply tokens scored."""
    gate_open: list[Tensor]
    """Per gate read, bool [n_chats]."""
    gate_scores: list[Tensor]
    """Per gate read, float32 [n_chats]."""

    @property
    def ce(self) -> float:
        """Mean NLL per reply token."""
        return float(self.nll.sum() / self.count.sum())


def _batch(
    prompts: Sequence[list[int]], replies: Sequence[list[int]], pad: int
) -> tuple[Tensor, Tensor, int]:
    """(ids int64 [B, P + R], attention mask [B, P + R], P): prompts left-padded to P, replies
    right-padded to R."""
    width_p = max(len(p) for p in prompts)
    width_r = max(len(r) for r in replies)
    ids = torch.full((len(prompts), width_p + width_r), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        ids[i, width_p - len(p) : width_p + len(r)] = torch.tensor(p + r, dtype=torch.int64)
        mask[i, width_p - len(p) : width_p + len(r)] = 1
    return ids, mask, width_p


class ChatProbe:
    """Held-out chats tokenised once; `run` scores them under interventions."""

    def __init__(
        self,
        tokenizer,
        chats: Sequence[tuple[str, str]],
        max_reply_tokens: int,
        batch_size: int = 16,
    ):
        prompts = render_prompts(tokenizer, [u for u, _ in chats])
        replies = [
            tokenizer(a, add_special_tokens=False)["input_ids"][:max_reply_tokens] for _, a in chats
        ]
        keep = [i for i, r in enumerate(replies) if len(r) >= 1]
        self.prompts = [prompts[i] for i in keep]
        self.replies = [replies[i] for i in keep]
        self.batch_size = batch_size
        self.pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    def __len__(self) -> int:
        return len(self.prompts)

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        interventions: Sequence[Intervention] = (),
        gates: Sequence[Gate] = (),
    ) -> ProbeResult:
        """Per-chat reply NLL under `interventions`, reading `gates` (and the interventions'
        own gates) on the prompt pass."""
        device = next(model.parameters()).device
        order = sorted(range(len(self)), key=lambda i: len(self.prompts[i]))
        nll = torch.zeros(len(self), dtype=torch.float64)
        count = torch.zeros(len(self), dtype=torch.int64)
        readings: list[list[tuple[Tensor, Tensor]]] = []
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, mask, width_p = _batch(
                [self.prompts[i] for i in rows], [self.replies[i] for i in rows], self.pad
            )
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            with steer(model, interventions, prompt_len=width_p, gates=gates) as steering:
                first = model(
                    input_ids=ids[:, :width_p],
                    attention_mask=mask[:, :width_p],
                    position_ids=pos[:, :width_p],
                    use_cache=True,
                )
                rest = model(
                    input_ids=ids[:, width_p:],
                    attention_mask=mask,
                    position_ids=pos[:, width_p:],
                    cache=first.past_key_values,
                    use_cache=True,
                )
                readings.append([(r.scores, r.open) for r in steering.prompt_readings()])
            logits = torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], 1).float()
            target = ids[:, width_p:]
            valid = mask[:, width_p:].bool()
            loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none") * valid
            idx = torch.tensor(rows)
            nll[idx] = loss.sum(1).double().cpu()
            count[idx] = valid.sum(1).cpu()
        n_gates = len(readings[0]) if readings else 0
        scores, opened = [], []
        for g in range(n_gates):
            s = torch.zeros(len(self))
            o = torch.zeros(len(self), dtype=torch.bool)
            for b, start in enumerate(range(0, len(order), self.batch_size)):
                idx = torch.tensor(order[start : start + self.batch_size])
                s[idx], o[idx] = readings[b][g]
            scores.append(s)
            opened.append(o)
        return ProbeResult(nll, count, opened, scores)
