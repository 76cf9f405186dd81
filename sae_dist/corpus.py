"""A local corpus file as an indexed list of records, and the seeded document order of a split.

A local source (the embedded ShareGPT file, a user's .json / .jsonl / .txt) is indexed once per
process: the byte span of every record (a top-level value of a JSON array, a non-blank line of
a JSON-lines or text file). Any record can then be read alone, so a split can read the file in a
seeded random order and sample every region of it instead of its first documents (DESIGN.md
section 5). Indexing the 125 MB embedded ShareGPT file (17,671 records) parses it once, a few
seconds; the index holds 16 bytes per record.
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval", "reserved")
"""train and eval (every `holdout_every`-th document of the main order) share the main region
of the file; `reserved` is the tail that neither reads."""

_BETWEEN_JSON_VALUES = re.compile(r"[\s,\[\]]*")


def json_value_spans(path: Path, chunk_chars: int = 1 << 20) -> np.ndarray:
    """int64 [n, 2]: byte offsets [start, end) of each complete top-level value of a JSON array
    (or of concatenated JSON values). Reads `chunk_chars` characters at a time; a value cut off
    by the end of the file (a truncated tail) is left out with a log line."""
    decoder = json.JSONDecoder()
    spans: list[tuple[int, int]] = []
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False
        byte_of_pos, counted = 0, 0  # bytes of buf[:counted] are byte_of_pos past buf's start
        buf_byte = 0  # byte offset of buf[0] in the file

        def byte_at(p: int) -> int:
            nonlocal byte_of_pos, counted
            byte_of_pos += len(buf[counted:p].encode("utf-8"))
            counted = p
            return buf_byte + byte_of_pos

        while True:
            between = _BETWEEN_JSON_VALUES.match(buf, pos)
            assert between is not None  # the pattern matches the empty string
            pos = between.end()
            try:
                _, end = decoder.raw_decode(buf, pos)
                complete = end < len(buf) or eof  # a number may continue in the next chunk
            except json.JSONDecodeError:
                end, complete = pos, False
            if complete:
                spans.append((byte_at(pos), byte_at(end)))
                pos = end
                continue
            if eof:
                if pos < len(buf):
                    logger.info(
                        "%s: ignoring %d characters of truncated tail", path, len(buf) - pos
                    )
                break
            more = f.read(chunk_chars)
            eof = not more
            buf_byte = byte_at(pos)
            buf, pos, byte_of_pos, counted = buf[pos:] + more, 0, 0, 0
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def line_spans(path: Path) -> np.ndarray:
    """int64 [n, 2]: byte offsets [start, end) of each non-blank line (end excludes the line
    break)."""
    spans = []
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                spans.append((offset, offset + len(line.rstrip(b"\r\n"))))
            offset += len(line)
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


@lru_cache(maxsize=8)
def _spans(path: str, size: int, mtime_ns: int) -> np.ndarray:
    """Record spans of `path` (cached per file version: size and modification time)."""
    logger.info("indexing the records of %s (%.1f MB)", path, size / 1e6)
    return json_value_spans(Path(path)) if path.endswith(".json") else line_spans(Path(path))


class LocalCorpus:
    """Random access to the records of a local .json (array), .jsonl or .txt file.

    `record(i)` is the i-th record in file order: a parsed JSON value (None for a JSON-lines
    line that does not parse), or {text_field: line} for a text file."""

    def __init__(self, path: Path, text_field: str = "text"):
        self.path, self.text_field = Path(path), text_field
        stat = self.path.stat()
        self.spans = _spans(str(self.path), stat.st_size, stat.st_mtime_ns)

    def __len__(self) -> int:
        return len(self.spans)

    def record(self, i: int, f) -> Any:
        """Record i, read from the open binary file `f` of this corpus."""
        start, end = self.spans[i]
        f.seek(int(start))
        text = f.read(int(end - start)).decode("utf-8")
        if self.path.suffix == ".txt":
            return {self.text_field: text}
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return None


def document_order(
    n: int, split: str, seed: int, shuffle: bool, reserved_frac: float
) -> np.ndarray:
    """int64 [m]: the file indices a split reads, in reading order.

    The last round(n * reserved_frac) records (file order) form the reserved region, the rest
    the main region shared by train and eval. A region is read in a permutation seeded by
    `seed` (the reserved one by seed + 1) when `shuffle`, else in file order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; allowed: {', '.join(SPLITS)}")
    n_main = n - round(n * reserved_frac)
    lo, hi, region_seed = (n_main, n, seed + 1) if split == "reserved" else (0, n_main, seed)
    indices = np.arange(lo, hi, dtype=np.int64)
    if shuffle:
        np.random.default_rng(region_seed).shuffle(indices)
    return indices
