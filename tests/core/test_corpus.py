"""Local corpus index: record byte spans, random access, and the seeded document order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_dist.corpus import LocalCorpus, document_order, json_value_spans

RECORDS = [{"id": i, "text": "é€x" * (i * 3), "n": [1.5, i]} for i in range(20)]
"""Multi-byte characters, so byte and character offsets differ."""


def records_of(path, spans) -> list:
    raw = path.read_bytes()
    return [json.loads(raw[a:b].decode("utf-8")) for a, b in spans]


def test_json_spans_survive_chunks_truncated_tail_and_numbers(tmp_path):
    body = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS)
    path = tmp_path / "cut.json"
    path.write_text(body + ',\n{"id": 20, "text": "trunc', encoding="utf-8")
    for chunk in (3, 64, 1 << 20):
        assert records_of(path, json_value_spans(path, chunk_chars=chunk)) == RECORDS
    path.write_text(body + "\n]\n", encoding="utf-8")
    assert records_of(path, json_value_spans(path, chunk_chars=5)) == RECORDS
    path.write_text("[1, 23, 456]")  # a number may not be cut at a chunk boundary
    assert records_of(path, json_value_spans(path, chunk_chars=2)) == [1, 23, 456]


def test_jsonl_and_text_records_by_index(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS[:5]]
    jsonl.write_text("\n".join(lines[:2]) + "\n\n  \nnot json\r\n" + "\n".join(lines[2:]) + "\n")
    corpus = LocalCorpus(jsonl)
    with open(jsonl, "rb") as f:
        got = [corpus.record(i, f) for i in reversed(range(len(corpus)))][::-1]
    assert got == [*RECORDS[:2], None, *RECORDS[2:5]]
    txt = tmp_path / "c.txt"
    txt.write_text("first line\n\nsecond é line\r\nthird")
    corpus = LocalCorpus(txt, text_field="body")
    with open(txt, "rb") as f:
        assert [corpus.record(i, f) for i in (2, 0, 1)] == [
            {"body": "third"},
            {"body": "first line"},
            {"body": "second é line"},
        ]


def test_document_order_is_a_seeded_permutation_with_a_disjoint_reserved_tail():
    main = document_order(1000, "train", seed=0, shuffle=True, reserved_frac=0.1)
    assert sorted(main.tolist()) == list(range(900))
    assert np.array_equal(main, document_order(1000, "eval", 0, True, 0.1))  # one main order
    assert not np.array_equal(main, document_order(1000, "train", 1, True, 0.1))
    reserved = document_order(1000, "reserved", seed=0, shuffle=True, reserved_frac=0.1)
    assert sorted(reserved.tolist()) == list(range(900, 1000))
    # every tenth of the file is present in the first 100 documents read
    assert len(np.unique(main[:100] // 90)) == 10
    assert document_order(5, "train", 0, False, 0.0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="split='test'"):
        document_order(5, "test", 0, True, 0.0)
