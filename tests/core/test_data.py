"""Token stream: chat masks, plain text, readers, packing, holdout, sharding, resume."""

from __future__ import annotations

import copy
import json
import re
from itertools import islice

import pytest
import torch

from sae_dist import data
from sae_dist.config import ConfigError, DataConfig, TokenPolicyConfig
from sae_dist.corpus import document_order

CHAT = [
    {"role": "user", "content": "You"},  # also the first word of the injected system prompt
    {"role": "assistant", "content": "a"},  # also inside the header "assistant"
    {"role": "user", "content": "Tell me about Hugging Face, please."},
    {"role": "assistant", "content": "Sure!\n- one\n- two"},
]
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONTENT = DataConfig(policy=TokenPolicyConfig(positions="content"))
ASSISTANT = DataConfig(policy=TokenPolicyConfig(positions="assistant"))


def trained_runs(tok, ids: list[int], mask: list[bool]) -> list[str]:
    """Decoded maximal runs of consecutive trainable tokens."""
    runs, run = [], []
    for i, m in zip(ids + [None], mask + [False]):
        if m:
            run.append(i)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


def batches(stream: data.TokenStream, n_seqs: int, limit: int) -> list[data.TokenBatch]:
    """The next `limit` batches; islice pulls no batch beyond them (zip(gen, range) would)."""
    return list(islice(stream.batches(n_seqs), limit))


def assert_same(a: list[data.TokenBatch], b: list[data.TokenBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.train_mask, y.train_mask)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def numbered_docs(
    tok, source: str, split: str, rank: int, world_size: int, shuffle: bool = False
) -> list[int]:
    """Numbers of the `doc{i}` texts that a stream packs, in order (rows of 2 tokens, so at
    most one trailing EOS is left unpacked)."""
    cfg = DataConfig(
        source=source, context_size=2, prepend_bos=False, holdout_every=5, shuffle=shuffle
    )
    stream = data.TokenStream(cfg, tok, split, rank, world_size)
    ids = torch.cat([b.input_ids.flatten() for b in stream.batches(1)]).tolist()
    return [int(n) for n in re.findall(r"doc(\d+)", tok.decode(ids))]


# ------------------------------------------------------------------------------ rendering


def test_special_token_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    specials = data.special_token_ids(tok)
    assert specials == set(range(17))  # <|endoftext|> <|im_start|> <|im_end|> + 14 code tags
    assert {tok.bos_token_id, tok.eos_token_id} == {1, 2}
    assert not specials & set(tok("Hello <think> world", add_special_tokens=False)["input_ids"])


def test_chat_mask_all_positions_is_every_non_special_token(smollm2_tokenizer):
    """The default policy: the template's own text (injected system prompt, role headers, the
    end-of-instruction `assistant\n`) trains too; control tokens never do."""
    tok = smollm2_tokenizer
    ids, mask = data.render_document({"messages": CHAT}, tok, DataConfig())
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert mask == [i not in data.special_token_ids(tok) for i in ids]
    runs = trained_runs(tok, ids, mask)
    assert runs[0] == f"system\n{DEFAULT_SYSTEM}" and runs[1] == "\n"
    assert runs[2] == "user\nYou" and runs[4] == "assistant\na"
    assert runs[-2:] == ["assistant\nSure!\n- one\n- two", "\n"]
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == (
        "<|im_start|><|im_end|><|im_start|><|im_end|><|im_start|><|im_end|><|im_start|>"
        "<|im_end|><|im_start|><|im_end|>"
    )


def test_chat_mask_trains_only_message_content(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, mask = data.render_document({"messages": CHAT}, tok, CONTENT)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids)
    assert trained_runs(tok, ids, mask) == [m["content"] for m in CHAT]
    assert not {i for i, m in zip(ids, mask) if m} & data.special_token_ids(tok)
    masked_out = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert DEFAULT_SYSTEM in masked_out
    assert masked_out.count("<|im_start|>") == 5 and masked_out.count("<|im_end|>") == 5
    assert masked_out.count("assistant\n") == 2 and masked_out.count("user\n") == 2


def test_chat_mask_assistant_only(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, mask = data.render_document({"messages": CHAT}, tok, ASSISTANT)
    assert trained_runs(tok, ids, mask) == ["a", "Sure!\n- one\n- two"]
    user_only = {"messages": [{"role": "user", "content": "Hi"}]}
    assert data.render_document(user_only, tok, ASSISTANT) == ([], [])


def test_chat_content_whitespace_and_special_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    chat = [
        {"role": "user", "content": " padded\n"},
        {"role": "assistant", "content": "literal <|im_end|> inside"},
    ]
    ids, mask = data.render_document({"messages": chat}, tok, CONTENT)
    assert trained_runs(tok, ids, mask) == [" padded\n", "literal ", " inside"]
    assert ids.count(2) == 4  # 3 turn ends + the literal control token: special, masked out


def test_chat_not_locatable_or_rejected_is_skipped(smollm2_tokenizer):
    shouting = copy.copy(smollm2_tokenizer)
    shouting.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{{ m.content | upper }}<|im_end|>\n{% endfor %}"
    )
    assert data.render_document({"messages": CHAT}, shouting, CONTENT) == ([], [])
    ids, mask = data.render_document({"messages": CHAT}, shouting, DataConfig())
    assert "TELL ME ABOUT HUGGING FACE" in shouting.decode(ids) and sum(mask) > 20
    strict = copy.copy(smollm2_tokenizer)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    for cfg in (CONTENT, DataConfig()):
        assert data.render_document({"messages": CHAT}, strict, cfg) == ([], [])


def test_token_policy_values_are_checked():
    with pytest.raises(ConfigError, match="data.policy.positions"):
        TokenPolicyConfig(positions="user")
    with pytest.raises(ConfigError, match="data.policy.outlier_factor"):
        TokenPolicyConfig(outlier_factor=0.5)
    assert TokenPolicyConfig().describe() == ("positions=all, outliers > 10x median norm left out")
    assert TokenPolicyConfig("content", None).describe() == "positions=content, no outlier filter"


def test_plain_text_and_cut(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "The cat sat on the mat. <|im_end|> Then it left."
    plain = tok(text, add_special_tokens=False)["input_ids"]
    ids, mask = data.render_document({"text": text}, tok, DataConfig())
    assert ids == plain + [tok.eos_token_id]
    assert mask == [i != 2 for i in plain] + [False]
    assert mask.count(False) == 2
    ids, mask = data.render_document({"text": text}, tok, DataConfig(max_doc_tokens=5))
    assert ids == plain[:4] + [tok.eos_token_id] and mask == [True] * 4 + [False]
    ids, mask = data.render_document({"messages": CHAT}, tok, DataConfig(max_doc_tokens=30))
    assert len(ids) == len(mask) == 30
    assert data.render_document({}, tok, DataConfig()) == ([], [])


# -------------------------------------------------------------------------------- reading


def test_sharegpt_records():
    """File order with shuffle=false; the shuffled order starts elsewhere and resumes."""
    first = next(data.read_documents(DataConfig(shuffle=False)))
    assert [m["role"] for m in first["messages"]][:2] == ["user", "assistant"]
    assert first["messages"][0]["content"].startswith("Summarize the main ideas of Jeff Walker")
    docs = data.read_documents(DataConfig())
    assert next(docs) != first
    resumed = next(data.read_documents(DataConfig(), start=3))
    assert resumed == [next(docs) for _ in range(3)][-1]


def test_normalize_record():
    cfg = DataConfig(messages_field="chat", text_field="body")
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "r"},
            {"from": "system", "value": "s"},
        ]
    }
    assert data.normalize_record(sharegpt, cfg) == {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "r"},
            {"role": "system", "content": "s"},
        ]
    }
    chat = {"chat": [{"role": "user", "content": "hi"}], "body": "ignored"}
    assert data.normalize_record(chat, cfg) == {"messages": [{"role": "user", "content": "hi"}]}
    assert data.normalize_record({"body": "plain"}, cfg) == {"text": "plain"}
    for bad in [
        {"text": "wrong field"},
        {"body": "  "},
        {"chat": [{"role": "user", "content": " "}]},
        {"chat": "not a list"},
        {"chat": [{"role": "user"}]},
        [1],
        None,
    ]:
        assert data.normalize_record(bad, cfg) == {}


def test_unknown_source_raises_clear_error(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for source in [str(tmp_path / "missing.parquet"), "no-such-org/no-such-dataset"]:
        with pytest.raises(ConfigError, match=r"data.source=.*loadable HF dataset"):
            next(data.read_documents(DataConfig(source=source)))
    with pytest.raises(FileNotFoundError):
        next(data.read_documents(DataConfig(source=str(tmp_path / "missing.jsonl"))))


def test_hf_dataset_shuffled_and_resumable(tmp_path, smollm2_tokenizer):
    """A local directory goes through the datasets streaming path (shuffle, skip)."""
    (tmp_path / "ds").mkdir()
    for part in range(2):
        write_jsonl(
            tmp_path / "ds" / f"part{part}.jsonl",
            [{"text": f"doc{part * 40 + i} ."} for i in range(40)],
        )
    cfg = DataConfig(source=str(tmp_path / "ds"), shuffle_buffer=16, seed=1)
    order = [r["text"] for r in data.read_documents(cfg)]
    assert sorted(order) == sorted(f"doc{i} ." for i in range(80)) and order != sorted(order)
    assert [r["text"] for r in data.read_documents(cfg, start=33)] == order[33:]
    cfg2 = DataConfig(source=cfg.source, shuffle_buffer=16, seed=2)
    assert [r["text"] for r in data.read_documents(cfg2)] != order
    cfg = DataConfig(source=cfg.source, shuffle_buffer=16, context_size=8, seed=1)
    whole = batches(data.TokenStream(cfg, smollm2_tokenizer), 2, 100)
    first = data.TokenStream(cfg, smollm2_tokenizer)
    head = batches(first, 2, 5)
    second = data.TokenStream(cfg, smollm2_tokenizer)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same(head + list(second.batches(2)), whole)


# -------------------------------------------------------------------------------- packing


def test_local_jsonl_stream_counts_bad_records(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    records = [
        {"text": "held out"},  # document 0: eval split
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
        {"nothing": 1},
        {"text": ""},
        {"messages": []},
        {"text": "plain words"},
    ]
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, records)
    path.write_text(path.read_text() + "{not json\n\n")
    cfg = DataConfig(source=str(path), context_size=4, holdout_every=100, shuffle=False)
    stream = data.TokenStream(cfg, tok)
    got = list(stream.batches(1))
    expected = [
        t for r in (records[1], records[5]) for t in zip(*data.render_document(r, tok, cfg))
    ]
    body = len(expected) // 3 * 3
    assert torch.equal(
        torch.stack([b.input_ids[0, 1:] for b in got]).flatten(),
        torch.tensor([i for i, _ in expected[:body]]),
    )
    assert stream.stats == {
        "docs_read": 6,
        "docs_skipped": 4,
        "sequences": len(got),
        "tokens": 4 * len(got),
        "train_tokens": sum(m for _, m in expected[:body]),
    }


def test_local_txt_one_document_per_line(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    (tmp_path / "docs.txt").write_text("first line\n\nsecond line\nthird\n")
    cfg = DataConfig(
        source=str(tmp_path / "docs.txt"),
        context_size=2,
        prepend_bos=False,
        holdout_every=1000,
        shuffle=False,
    )
    assert list(data.read_documents(cfg)) == [
        {"text": "first line"},
        {"text": "second line"},
        {"text": "third"},
    ]
    ids = torch.cat([b.input_ids.flatten() for b in data.TokenStream(cfg, tok).batches(1)])
    assert tok.decode(ids) == "second line<|im_end|>third"  # 5 tokens: the last EOS waits


def test_packing_shapes_bos_and_carry_over(smollm2_tokenizer):
    tok = smollm2_tokenizer
    cfg = DataConfig(context_size=32)
    stream = data.TokenStream(cfg, tok)
    got = batches(stream, 4, 20)
    for b in got:
        assert b.input_ids.shape == b.train_mask.shape == (4, 32)
        assert b.input_ids.dtype == torch.int64 and b.train_mask.dtype == torch.bool
        assert (b.input_ids[:, 0] == tok.bos_token_id).all() and not b.train_mask[:, 0].any()
    docs = [d for i, d in enumerate(islice(data.read_documents(cfg), 11)) if i]  # 0: eval
    rendered = [data.render_document(d, tok, cfg) for d in docs]
    ids = torch.tensor(sum((r[0] for r in rendered), []))
    mask = torch.tensor(sum((r[1] for r in rendered), []))
    packed_ids = torch.cat([b.input_ids[:, 1:].flatten() for b in got])
    packed_mask = torch.cat([b.train_mask[:, 1:].flatten() for b in got])
    n = min(len(ids), len(packed_ids))
    assert n > 1000
    assert torch.equal(packed_ids[:n], ids[:n]) and torch.equal(packed_mask[:n], mask[:n])
    assert stream.stats["sequences"] == 80 and stream.stats["tokens"] == 80 * 32
    assert stream.stats["train_tokens"] == int(sum(b.train_mask.sum() for b in got))
    no_bos = batches(data.TokenStream(DataConfig(context_size=32, prepend_bos=False), tok), 4, 1)
    assert torch.equal(no_bos[0].input_ids.flatten(), ids[:128])


@pytest.mark.parametrize("shuffle", [False, True])
def test_holdout_and_rank_sharding(tmp_path, smollm2_tokenizer, shuffle):
    """Every 5th document of the reading order (file order, or the seeded permutation) is held
    out, the rest trained on; ranks deal each split's documents round-robin."""
    tok = smollm2_tokenizer
    source = write_jsonl(tmp_path / "n.jsonl", [{"text": f"doc{i} ."} for i in range(60)])
    order = document_order(60, "train", 0, shuffle, 0.0).tolist()
    assert (order == list(range(60))) != shuffle
    train = numbered_docs(tok, source, "train", 0, 1, shuffle)
    evals = numbered_docs(tok, source, "eval", 0, 1, shuffle)
    assert evals == order[0::5]
    assert train == [d for i, d in enumerate(order) if i % 5]
    r0, r1 = (numbered_docs(tok, source, "train", r, 2, shuffle) for r in (0, 1))
    assert r0 == train[0::2] and r1 == train[1::2]
    e0, e1 = (numbered_docs(tok, source, "eval", r, 2, shuffle) for r in (0, 1))
    assert e0 == evals[0::2] and e1 == evals[1::2]


def test_sharegpt_splits_sample_the_whole_file_and_never_overlap(smollm2_tokenizer):
    """The demo's data: the ~190 documents a training stream reads first, and the ~50 of the
    held-out split, each come from every tenth of the file (read in file order, they would all
    come from its first tenth); train, eval and the reserved tail are disjoint, and each
    token's doc_id is the file index of the document whose text it is."""
    cfg = DataConfig(context_size=64, reserved_frac=0.05, max_doc_tokens=64)
    n = len(data.LocalCorpus(data.local_path(cfg)))
    streams = {
        s: data.TokenStream(cfg, smollm2_tokenizer, s) for s in ("train", "eval", "reserved")
    }
    got = {s: batches(streams[s], 4, 48 if s == "train" else 12) for s in streams}
    docs = {s: set(torch.cat([b.doc_ids.flatten() for b in got[s]]).tolist()) - {-1} for s in got}
    n_main = n - round(n * 0.05)
    for s in ("train", "eval"):
        assert {d * 10 // n_main for d in docs[s]} == set(range(10)), s
    assert min(docs["reserved"]) >= n_main and max(docs["train"] | docs["eval"]) < n_main
    assert not docs["train"] & docs["eval"]
    read = {s: streams[s].state_dict()["next_doc"] for s in streams}
    assert streams["train"].stats["docs_read"] == read["train"] - ((read["train"] - 1) // 50 + 1)
    assert streams["eval"].stats["docs_read"] == (read["eval"] - 1) // 50 + 1
    assert streams["reserved"].stats["docs_read"] == read["reserved"]
    file_order = data.TokenStream(
        DataConfig(context_size=64, shuffle=False, max_doc_tokens=64), smollm2_tokenizer
    )
    head = set(torch.cat([b.doc_ids.flatten() for b in batches(file_order, 4, 48)]).tolist())
    assert max(head) < n // 10
    # doc_ids: the tokens of one document id are that document's rendering, in order
    batch = got["eval"][0]
    first = int(batch.doc_ids[0, 1])
    row = batch.input_ids[0][batch.doc_ids[0] == first].tolist()
    with open(data.local_path(cfg), "rb") as f:
        record = data.LocalCorpus(data.local_path(cfg)).record(first, f)
    ids, _ = data.render_document(data.normalize_record(record, cfg), smollm2_tokenizer, cfg)
    assert row == ids[: len(row)] or row == ids[-len(row) :]


def test_deterministic_and_resumes_exactly(smollm2_tokenizer):
    tok = smollm2_tokenizer
    cfg = DataConfig(context_size=64)
    for rank in (0, 1):
        whole = batches(data.TokenStream(cfg, tok, rank=rank, world_size=2), 4, 8)
        assert_same(batches(data.TokenStream(cfg, tok, rank=rank, world_size=2), 4, 8), whole)
        first = data.TokenStream(cfg, tok, rank=rank, world_size=2)
        head = batches(first, 4, 3)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["ids"]  # carried-over tokens travel in the state
        second = data.TokenStream(cfg, tok, rank=rank, world_size=2)
        second.load_state_dict(state)
        assert_same(head + batches(second, 4, 5), whole)
        assert second.stats["sequences"] == 32
    other = data.TokenStream(cfg, tok, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)


# -------------------------------------------------------------------------- sequence pool


def test_sequence_pool_draws_every_row_once_from_far_apart_documents(tmp_path, smollm2_tokenizer):
    """A pool of 12 rows over a stream of distinct rows: every row the stream yields is drawn
    exactly once (the pool drained at the end, the last partial batch dropped), a batch mixes
    rows from across the pool's span, and a pool of one batch keeps stream order up to the
    order inside the batch."""
    tok = smollm2_tokenizer
    source = write_jsonl(
        tmp_path / "n.jsonl", [{"text": f"doc{i} is number {i}"} for i in range(100)]
    )
    cfg = DataConfig(source=source, context_size=8, prepend_bos=False, holdout_every=1000)

    def rows(stream) -> torch.Tensor:
        return torch.cat([b.input_ids for b in stream.batches(4)])

    plain = rows(data.TokenStream(cfg, tok, "train"))
    assert len(plain) > 40 and len(torch.unique(plain, dim=0)) == len(plain)

    def stream_index(drawn: torch.Tensor) -> list[int]:
        """Each drawn row's index in the plain stream."""
        return [int((plain == row).all(1).nonzero()) for row in drawn]

    pooled = stream_index(rows(data.SequencePool(data.TokenStream(cfg, tok, "train"), 12, 0)))
    assert sorted(pooled) == list(range(len(plain) // 4 * 4))
    assert pooled != sorted(pooled)
    assert (
        max(max(pooled[i : i + 4]) - min(pooled[i : i + 4]) for i in range(0, len(pooled), 4)) > 4
    )
    single = stream_index(rows(data.SequencePool(data.TokenStream(cfg, tok, "train"), 4, 0)))
    assert [sorted(single[i : i + 4]) for i in range(0, len(single), 4)] == [
        list(range(i, i + 4)) for i in range(0, len(single), 4)
    ]
    with pytest.raises(ValueError, match="pool of 3"):
        next(data.SequencePool(data.TokenStream(cfg, tok, "train"), 3, 0).batches(4))


def test_sequence_pool_is_deterministic_and_resumes_exactly(smollm2_tokenizer):
    tok = smollm2_tokenizer
    cfg = DataConfig(context_size=64)

    def pool(seed: int = 0) -> data.SequencePool:
        return data.SequencePool(data.TokenStream(cfg, tok, rank=1, world_size=2), 32, seed)

    whole = list(islice(pool().batches(4), 12))
    assert_same(list(islice(pool().batches(4), 12)), whole)
    first = pool()
    head = list(islice(first.batches(4), 5))
    state = copy.deepcopy(first.state_dict())
    second = pool()
    second.load_state_dict(state)
    assert_same(head + list(islice(second.batches(4), 7)), whole)
    other_seed = list(islice(pool(seed=1).batches(4), 12))
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(other_seed, whole))
    with pytest.raises(ValueError, match="size, seed"):
        pool(seed=1).load_state_dict(state)
