#!/usr/bin/env python3
"""FineWeb data tooling for this submission.

Subcommands
-----------
download   fetch the challenge's pre-tokenized shards + tokenizer from Hugging Face into
           data/datasets/fineweb10B_<variant>/ and data/tokenizers/
build      tokenize a docs.jsonl[.xz] file with a SentencePiece model into shards
           (--caseops: apply the lossless_caps_caseops_v1 transform first and write the
           validation byte sidecar fineweb_val_bytes_NNNNNN.bin, and print the plain-table / sidecar
           byte ratio of the validation documents)
check      validate a shard folder (headers, sizes, token ids, byte sidecar) and verify that
           no validation document also occurs in a training shard (the leak guard); --plain-ratio:
           the CaseOps validation set's plain-table / sidecar byte ratio
pydoc-corpus
           write a small offline docs.jsonl made of the installed Python's stdlib pydoc text
train-tokenizer
           train a SentencePiece BPE model with the challenge tokenizer's settings

Shard format (the challenge's): 256 little-endian int32 header words
(magic 20240520, version 1, token count, then zeros) followed by the tokens as uint16.
Every document starts with the tokenizer's BOS id (1 for the challenge tokenizers); no EOS.
CaseOps exports add, per validation shard fineweb_val_NNNNNN.bin, a sidecar
fineweb_val_bytes_NNNNNN.bin with the same header and one uint16 per validation token: the
number of UTF-8 bytes of the ORIGINAL (untransformed) text that the token stands for (0 for
BOS and for the case-operator tokens).  val_bpb = total nats / ln 2 / sum of the sidecar.

Library use (tests, trainer tests): ``write_shard``, ``read_shard``, ``list_shards``,
``build_shards``, ``download``, ``check_data``, ``iter_docs``, ``pydoc_docs``, ``train_tokenizer``;
CaseOps: ``caseops_encode``, ``caseops_decode``, ``caseops_tokenize``,
``caseops_original_byte_counts``.  Input problems raise ``DataError`` (a ``ValueError``
subclass) whose message names the offending file.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import gzip
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB = 65535  # ids must fit in uint16

DEFAULT_SHARD_TOKENS = 100_000_000  # same shard size as the challenge's exports

# Hugging Face dataset repositories hosting the challenge exports.  sp1024 is in the
# official repository; the sp8192 export is published in a community mirror with the same layout:
#   <prefix>/manifest.json
#   <prefix>/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin
#   <prefix>/tokenizers/fineweb_<vocab>_bpe.{model,vocab}
# with <prefix> = "datasets" (the challenge's data/cached_challenge_fineweb.py default).
REMOTE_ROOT_PREFIX = "datasets"
VARIANTS = {
    "sp1024": {"dataset": "fineweb10B_sp1024", "tokenizer": "fineweb_1024_bpe",
               "vocab": 1024, "repo_id": "willdepueoai/parameter-golf"},
    "sp8192": {"dataset": "fineweb10B_sp8192", "tokenizer": "fineweb_8192_bpe",
               "vocab": 8192, "repo_id": "kevclark/parameter-golf"},
    # CaseOps (lossless_caps_caseops_v1) export of PR #1729, same layout plus the validation byte sidecar.
    "sp8192_caseops": {"dataset": "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                       "tokenizer": "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved",
                       "vocab": 8192, "repo_id": "romeerp/parameter-golf-caseops-v1", "val_bytes": True},
}

# The challenge scores the first 50,000 documents of its doc stream; they must never reach a train shard.
# (The CaseOps prep script of the challenge defaulted to 10,000: its issue #2127.)
CHALLENGE_VAL_DOCS = 50_000

Fetch = Callable[[str, Path], None]


class DataError(ValueError):
    """A problem with the user's inputs or with downloaded files (one-line message)."""


# --------------------------------------------------------------------------------------
# Shard I/O
# --------------------------------------------------------------------------------------

def _atomic_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")


def write_shard(path: str | os.PathLike, tokens) -> int:
    """Write ``tokens`` as one shard file (atomically). Returns the number of tokens."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"{path}: tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and arr.dtype != TOKEN_DTYPE:
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{path}: tokens must be integers, got {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_VOCAB:
            raise DataError(f"{path}: token ids must be in [0, {MAX_VOCAB}], got [{lo}, {hi}]")
    arr = arr.astype(TOKEN_DTYPE, copy=False)
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = arr.size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(arr.tobytes())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return int(arr.size)


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and file size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: too small for a shard header ({size} bytes < {HEADER_BYTES})")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if int(header[0]) != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {int(header[0])} (expected {SHARD_MAGIC})")
    if int(header[1]) != SHARD_VERSION:
        raise DataError(f"{path}: unsupported version {int(header[1])} (expected {SHARD_VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + n * TOKEN_DTYPE.itemsize
    if n < 0 or size != expected:
        raise DataError(f"{path}: size {size} bytes does not match header ({n} tokens -> {expected} bytes)")
    return n


def read_shard(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Return the tokens of a shard as a uint16 array (validates magic/version/size)."""
    n = read_shard_header(path)
    if mmap:
        return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))
    return np.fromfile(path, dtype=TOKEN_DTYPE, count=n, offset=HEADER_BYTES)


def shard_name(split: str, index: int) -> str:
    """fineweb_<split>_NNNNNN.bin; split is "train", "val" or "val_bytes" (the CaseOps byte sidecar)."""
    return f"fineweb_{split}_{index:06d}.bin"


_SHARD_FILE = re.compile(r"fineweb_(train|val|val_bytes)_(\d{6})\.bin")


def list_shards(data_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """{"train": [...], "val": [...], "val_bytes": [...]} sorted by index.  Unlike the glob
    fineweb_val_*.bin, "val" never includes the byte sidecars fineweb_val_bytes_*.bin."""
    found: dict[str, list[tuple[int, Path]]] = {"train": [], "val": [], "val_bytes": []}
    for p in Path(data_dir).iterdir():
        m = _SHARD_FILE.fullmatch(p.name)
        if m and p.is_file():
            found[m.group(1)].append((int(m.group(2)), p))
    return {k: [p for _, p in sorted(v)] for k, v in found.items()}


# --------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------

def _open_text(path: Path) -> io.TextIOBase:
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def iter_docs(path: str | os.PathLike, max_docs: int | None = None) -> Iterator[str]:
    """Yield the "text" field of each JSON line of a .jsonl / .jsonl.xz / .jsonl.gz file.

    Blank lines are skipped. A malformed line raises DataError naming the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: docs file not found")
    if max_docs is not None and max_docs <= 0:
        return
    count = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{path}:{lineno}: expected an object with a string \"text\" field")
                yield obj["text"]
                count += 1
                if max_docs is not None and count >= max_docs:
                    return
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def load_tokenizer(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer model not found")
    try:
        import sentencepiece as spm
    except ImportError:
        raise DataError("sentencepiece is not installed (pip install sentencepiece)") from None
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError on bad files
        raise DataError(f"{path}: not a valid SentencePiece model ({e})") from None
    return sp


# --------------------------------------------------------------------------------------
# CaseOps: the lossless_caps_caseops_v1 text transform
# --------------------------------------------------------------------------------------
#
# Acts on maximal runs of ASCII letters [A-Za-z]+ ("words"); everything else is copied:
#   lowercase word            -> unchanged                      "the"      -> "the"
#   all caps, >= 2 letters    -> ALLCAPS + lowercase             "NASA"     -> ALLCAPS "nasa"
#   any other word            -> TITLE before it if its first letter is upper, CAPNEXT before
#                                every later upper letter, all letters lowercased:
#                                "The" -> TITLE "the", "I" -> TITLE "i", "McDonald" -> TITLE "mc" CAPNEXT "donald",
#                                "iPhone" -> "i" CAPNEXT "phone"
#   a literal operator character (U+E001..U+E004) in the input -> ESC + that character.
# Non-ASCII letters are not case-mapped ("École" -> "É" + "cole"), digits split words ("COVID19" ->
# ALLCAPS "covid" "19").  Same output as encode_lossless_caps_v2 of the challenge's lossless_caps.py,
# so the shipped tokenizer (ids 4..7 = TITLE, ALLCAPS, CAPNEXT, ESC) sees the same text.

CASEOPS_TRANSFORM = "lossless_caps_caseops_v1"
CASEOPS_TITLE, CASEOPS_ALLCAPS, CASEOPS_CAPNEXT, CASEOPS_ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CASEOPS_OPERATORS = CASEOPS_TITLE + CASEOPS_ALLCAPS + CASEOPS_CAPNEXT + CASEOPS_ESC

_CASED_WORD = re.compile(r"(?<![A-Za-z])[A-Za-z]*[A-Z][A-Za-z]*")  # a maximal run holding an upper letter
_OPERATOR_CHAR = re.compile("[\ue001-\ue004]")
_DECODE_STEP = re.compile("\ue004([\\s\\S])|\ue002([a-z]+)|[\ue001\ue003]([a-z])|[\ue001-\ue004]")


class CaseOpsError(DataError):
    """A string that is not a valid CaseOps encoding."""


def _encode_word(m: re.Match) -> str:
    w = m.group()
    if len(w) >= 2 and w.isupper():
        return CASEOPS_ALLCAPS + w.lower()
    if w[1:].islower() or len(w) == 1:  # Title (or a single capital): first letter is upper here
        return CASEOPS_TITLE + w.lower()
    out = [CASEOPS_TITLE + w[0].lower() if w[0] <= "Z" else w[0]]
    out.extend(CASEOPS_CAPNEXT + c.lower() if c <= "Z" else c for c in w[1:])
    return "".join(out)


def caseops_encode(text: str) -> str:
    """The lossless_caps_caseops_v1 transform of ``text`` (see the table above)."""
    if _OPERATOR_CHAR.search(text):
        text = _OPERATOR_CHAR.sub(lambda m: CASEOPS_ESC + m.group(), text)
    return _CASED_WORD.sub(_encode_word, text)


def _decode_step(m: re.Match) -> str:
    literal, caps, one = m.group(1, 2, 3)
    if literal is not None:
        return literal
    if caps is not None:
        return caps.upper()
    if one is not None:
        return one.upper()
    raise CaseOpsError(f"malformed CaseOps text: operator U+{ord(m.group()):04X} at character {m.start()} "
                       f"is not followed by what it applies to")


def caseops_decode(text: str) -> str:
    """Inverse of ``caseops_encode``: ``caseops_decode(caseops_encode(s)) == s`` for every string ``s``.
    A dangling operator (nothing after ESC, no ASCII letter after TITLE/ALLCAPS/CAPNEXT) raises CaseOpsError."""
    return _DECODE_STEP.sub(_decode_step, text)


def caseops_char_bytes(transformed: str) -> np.ndarray:
    """Per character of a CaseOps-encoded string: how many UTF-8 bytes of the ORIGINAL text it stands for.

    Operator characters count 0, a character escaped by ESC counts its own UTF-8 length (3), every other
    character its UTF-8 length (ASCII letters 1, whatever their original case).  Sums to
    len(caseops_decode(transformed).encode("utf-8")).
    """
    cps = np.frombuffer(transformed.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    nbytes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    op = (cps >= 0xE001) & (cps <= 0xE004)
    nbytes[op] = 0
    if CASEOPS_ESC in transformed:  # ESC escapes the next character: that one is literal text
        escaped_next = -1
        for pos in np.flatnonzero(op).tolist():
            if pos == escaped_next:
                nbytes[pos] = 3
            elif cps[pos] == 0xE004:
                escaped_next = pos + 1
    return nbytes


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _proto_pieces(buf: bytes) -> list[tuple[int, int, int]]:
    """(id, begin, end) of each piece of a serialized sentencepiece.SentencePieceText (begin/end are byte
    offsets into the UTF-8 input).  A minimal protobuf reader: sentencepiece's own parser needs protobuf."""
    pieces = []
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            if field == 2:  # repeated SentencePiece pieces = 2 {piece=1, id=2, surface=3, begin=4, end=5}
                vals = {2: 0, 4: 0, 5: 0}
                p, end = pos, pos + size
                while p < end:
                    k, p = _read_varint(buf, p)
                    if k & 7 == 0:
                        v, p = _read_varint(buf, p)
                        vals[k >> 3] = v
                    elif k & 7 == 2:
                        sz, p = _read_varint(buf, p)
                        p += sz
                    else:
                        p += 8 if k & 7 == 1 else 4
                pieces.append((vals[2], vals[4], vals[5]))
            pos += size
        else:
            raise DataError(f"unexpected protobuf wire type {wire} in a SentencePiece encoding")
    return pieces


def _piece_spans(sp, texts: list[str], num_threads: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each text: (token ids, begin, end) with begin/end the CHARACTER span of the input that each
    piece's surface covers (the pieces of one character split into byte-fallback tokens: empty spans
    but the last).  Characters the normalizer drops at the edges (leading/trailing whitespace, a BOM)
    belong to no piece."""
    try:  # sentencepiece >= 0.2.1: offsets straight from C++
        res = sp.encode(texts, out_type="offset_mapping", num_threads=num_threads)
        out = []
        for r in res:
            offs = np.asarray(r["offsets"], dtype=np.int64).reshape(-1, 2)
            out.append((np.asarray(r["ids"], dtype=np.int64), offs[:, 0], offs[:, 1]))
        return out
    except (TypeError, ValueError, RuntimeError, AttributeError):
        pass
    out = []
    for text in texts:  # older sentencepiece: parse the serialized proto (byte offsets -> char offsets)
        enc = getattr(sp, "encode_as_serialized_proto", None) or sp.EncodeAsSerializedProto
        pieces = np.asarray(_proto_pieces(enc(text)), dtype=np.int64).reshape(-1, 3)
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        char_start = np.concatenate([[0], np.cumsum(1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800)
                                                    + (cps >= 0x10000))])
        out.append((pieces[:, 0], np.searchsorted(char_start, pieces[:, 1]),
                    np.searchsorted(char_start, pieces[:, 2])))
    return out


def caseops_original_byte_counts(transformed: str, begin, end, exact: bool = False) -> np.ndarray:
    """Per token: the UTF-8 bytes of the ORIGINAL text it stands for, from its character span
    [begin, end) in the CaseOps-encoded text.

    Default (the published export's rule, lossless_caps.surface_piece_original_byte_counts): the bytes of
    the token's own surface, operator characters counting 0.  Characters SentencePiece drops without
    giving them to any piece (leading/trailing whitespace, a leading BOM) count nowhere.
    ``exact=True`` instead gives each token everything from the previous token's end to its own end
    (the last token also takes the tail), so the counts sum to the document's full UTF-8 size.
    """
    weight = np.concatenate([[0], np.cumsum(caseops_char_bytes(transformed))])
    begin = np.asarray(begin, dtype=np.int64)
    end = np.asarray(end, dtype=np.int64)
    if not exact:
        return weight[end] - weight[begin]
    if end.size == 0:
        return np.zeros(0, dtype=np.int64)
    stops = np.maximum.accumulate(end)
    stops[-1] = len(transformed)
    return np.diff(weight[np.concatenate([[0], stops])])


def caseops_tokenize(sp, texts: list[str], exact: bool = False,
                     num_threads: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """CaseOps-encode and tokenize ``texts``; per text (token ids, original UTF-8 bytes per token).
    ``sp`` is the CaseOps SentencePiece model (a SentencePieceProcessor); no BOS is added."""
    encoded = [caseops_encode(t) for t in texts]
    return [(ids, caseops_original_byte_counts(tr, b, e, exact=exact))
            for tr, (ids, b, e) in zip(encoded, _piece_spans(sp, encoded, num_threads))]


# The two bpb denominators.  A CaseOps sidecar counts the ORIGINAL UTF-8 bytes of each token, whitespace that
# the plain tokenizer's normalizer folds included ("\n\n" -> " "); the official scorer counts, for plain data,
# the plain tokenizer's byte table.  Over the same documents the two totals differ (ratio about 0.93).

PLAIN_TOKENIZER = VARIANTS["sp8192"]["tokenizer"] + ".model"
CASEOPS_TOKENIZER = VARIANTS["sp8192_caseops"]["tokenizer"] + ".model"


def plain_byte_tables(sp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, space, boundary) per token id: the official scorer's byte table, the numpy twin of
    train_gpt_human.build_byte_tables (same rule: a '▁' piece costs one more byte unless the previous token
    is a boundary = control/unknown/unused; control/unknown tokens 0 bytes, byte tokens 1)."""
    n = sp.get_piece_size()
    base, space, boundary = np.zeros(n, np.int64), np.zeros(n, bool), np.ones(n, bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            base[i] = 1
        else:
            space[i] = piece.startswith("\u2581")
            base[i] = len(piece[int(space[i]):].encode("utf-8"))
    return base, space, boundary


def plain_table_bytes(sp, texts: list[str], num_threads: int = 0, tables=None) -> int:
    """Bytes the official scorer counts for ``texts`` tokenized with the PLAIN tokenizer ``sp``, each
    document after its BOS (the stream's layout): per token base + (space and previous not a boundary)."""
    base, space, boundary = tables or plain_byte_tables(sp)
    total = 0
    for ids in sp.encode(list(texts), num_threads=num_threads):
        ids = np.asarray(ids, dtype=np.int64)
        prev = np.append(sp.bos_id(), ids)[:-1]
        total += int(base[ids].sum() + (space[ids] & ~boundary[prev]).sum())
    return total


def caseops_texts(sp, tokens: np.ndarray, bos_id: int = 1, num_threads: int = 0) -> list[str]:
    """The documents of a CaseOps token stream as text (``sp``: the CaseOps tokenizer): each document's
    tokens (after its BOS) decoded and ``caseops_decode``d.  That is the original text after SentencePiece's
    normalization, which the plain tokenizer (same normalizer) encodes like the original."""
    starts, ends = _doc_bounds(np.asarray(tokens), bos_id)
    docs = [tokens[s:e].tolist() for s, e in zip(starts.tolist(), ends.tolist())]
    return [caseops_decode(t) for t in sp.decode(docs, num_threads=num_threads)] if docs else []


def caseops_ratio_line(sidecar_bytes: int, plain_bytes: int, vocab: int) -> str:
    ratio = plain_bytes / max(1, sidecar_bytes)
    return (f"caseops val bytes: sidecar {sidecar_bytes}, plain sp{vocab} table {plain_bytes}, "
            f"ratio M/N = {ratio:.6f} (compare bpb only over one denominator; README \"CaseOps\")")


# --------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------

class _ShardWriter:
    """Accumulates token arrays and flushes fixed-size shards for one split."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=TOKEN_DTYPE)
        self.fill = 0
        self.files: list[Path] = []
        self.tokens = 0
        self.total = 0  # sum of the values written (the byte total, for a sidecar)

    def add(self, toks: np.ndarray) -> None:
        pos = 0
        while pos < toks.size:
            take = min(self.shard_tokens - self.fill, toks.size - pos)
            self.buf[self.fill:self.fill + take] = toks[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        path = self.out_dir / shard_name(self.split, len(self.files))
        write_shard(path, self.buf[:self.fill])
        self.files.append(path)
        self.tokens += self.fill
        self.total += int(self.buf[:self.fill].sum(dtype=np.int64))
        self.fill = 0


def build_shards(docs_path: str | os.PathLike, tokenizer_path: str | os.PathLike,
                 out_dir: str | os.PathLike, val_docs: int = CHALLENGE_VAL_DOCS, max_docs: int | None = None,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, batch_docs: int = 256,
                 log: Callable[[str], None] | None = None, caseops: bool = False,
                 exact_bytes: bool = False, plain_tokenizer: str | os.PathLike | None = None) -> dict:
    """Tokenize docs into val shards (first ``val_docs`` docs) and train shards (the rest).

    ``val_docs`` defaults to the challenge's 50,000 scored documents.  With ``caseops`` every document
    is CaseOps-encoded before tokenization (use the CaseOps tokenizer) and each val shard gets its byte
    sidecar fineweb_val_bytes_NNNNNN.bin (uint16 per token: original UTF-8 bytes, 0 for BOS; see
    ``caseops_original_byte_counts`` for ``exact_bytes``).  With ``caseops`` and ``plain_tokenizer`` (the
    plain model, e.g. fineweb_8192_bpe.model; skipped with a log line when the file is absent) it also counts
    the validation documents' bytes by the official scorer's table for that tokenizer (``plain_table_bytes``)
    and logs the plain-table / sidecar byte ratio.
    Existing fineweb_{train,val}_*.bin files (sidecars included) in ``out_dir`` are removed first so the
    directory always holds exactly one consistent build.  Returns a dict with
    docs, docs_val, docs_train, tokens_val, tokens_train, files_val, files_train, files_val_bytes
    (lists of paths), bytes_val (sidecar total, 0 without caseops), plain_bytes_val (the plain-table bytes of
    the validation documents, None when not counted), vocab_size and bos_id.
    """
    docs_path, tokenizer_path, out_dir = Path(docs_path), Path(tokenizer_path), Path(out_dir)
    if val_docs is None:
        val_docs = CHALLENGE_VAL_DOCS
    if val_docs < 0:
        raise DataError(f"--val-docs must be >= 0, got {val_docs}")
    if max_docs is not None and max_docs <= 0:
        raise DataError(f"--max-docs must be > 0, got {max_docs}")
    if shard_tokens <= 0:
        raise DataError(f"--shard-tokens must be > 0, got {shard_tokens}")
    if not docs_path.is_file():
        raise DataError(f"{docs_path}: docs file not found")
    sp = load_tokenizer(tokenizer_path)
    vocab = sp.get_piece_size()
    if vocab > MAX_VOCAB:
        raise DataError(f"{tokenizer_path}: vocab size {vocab} does not fit in uint16 shards (max {MAX_VOCAB})")
    bos = sp.bos_id()
    if bos < 0:
        raise DataError(f"{tokenizer_path}: tokenizer has no BOS token (bos_id disabled)")

    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in ("fineweb_train_*.bin", "fineweb_val_*.bin"):
        for stale in out_dir.glob(pattern):
            stale.unlink()

    if val_docs < CHALLENGE_VAL_DOCS and log:
        log(f"warning: --val-docs {val_docs} is below the {CHALLENGE_VAL_DOCS} documents the challenge scores: "
            f"documents #{val_docs} and later go to the train shards, so this data must never "
            f"be scored against the official validation split (challenge issue #2127)")
    if caseops and sp.piece_to_id(CASEOPS_TITLE) == sp.unk_id() and log:
        log(f"warning: {tokenizer_path} has no CaseOps operator pieces (expected the "
            f"lossless_caps_caseops_v1 tokenizer): operators will become <unk>/byte tokens")

    sp_plain, plain_tables, plain_bytes = None, None, 0  # the plain tokenizer, for the byte ratio
    if caseops and plain_tokenizer is not None:
        if Path(plain_tokenizer).is_file():
            sp_plain = load_tokenizer(plain_tokenizer)
            plain_tables = plain_byte_tables(sp_plain)
        elif log:
            log(f"caseops val bytes: plain tokenizer {plain_tokenizer} not found, plain-table/sidecar "
                f"byte ratio skipped (--plain-tokenizer)")

    writers = {s: _ShardWriter(out_dir, s, shard_tokens) for s in ("val", "train")}
    sidecar = _ShardWriter(out_dir, "val_bytes", shard_tokens) if caseops else None
    ndocs = {"val": 0, "train": 0}
    threads = max(1, min(8, os.cpu_count() or 1))

    def add(split: str, ids, nbytes=None) -> None:
        arr = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)
        arr[0] = bos
        arr[1:] = ids
        writers[split].add(arr)
        ndocs[split] += 1
        if nbytes is not None:
            counts = np.zeros(arr.size, dtype=np.int64)  # BOS stands for 0 bytes
            counts[1:] = nbytes
            if counts.size > 1 and int(counts.max()) > MAX_VOCAB:
                raise DataError(f"{docs_path}: document {ndocs[split] - 1} has a token standing for "
                                f"{int(counts.max())} bytes (> {MAX_VOCAB}, does not fit the uint16 sidecar)")
            sidecar.add(counts.astype(TOKEN_DTYPE))

    def encode_batch(texts: list[str], first_index: int) -> None:
        nonlocal plain_bytes
        n_val = max(0, min(len(texts), val_docs - first_index))
        if caseops:
            for ids, nbytes in caseops_tokenize(sp, texts[:n_val], exact=exact_bytes, num_threads=threads):
                add("val", ids, nbytes)
            if sp_plain is not None:
                plain_bytes += plain_table_bytes(sp_plain, texts[:n_val], threads, plain_tables)
            for ids in sp.encode([caseops_encode(t) for t in texts[n_val:]], num_threads=threads):
                add("train", ids)
        else:
            for i, ids in enumerate(sp.encode(texts)):
                add("val" if i < n_val else "train", ids)

    batch: list[str] = []
    seen = 0
    for text in iter_docs(docs_path, max_docs):
        batch.append(text)
        if len(batch) >= batch_docs:
            encode_batch(batch, seen)
            seen += len(batch)
            batch = []
            if log:
                log(f"tokenized {seen} docs")
    if batch:
        encode_batch(batch, seen)
        seen += len(batch)
    for w in writers.values():
        w.flush()
    if sidecar is not None:
        sidecar.flush()

    if seen == 0:
        raise DataError(f"{docs_path}: no documents found")
    if ndocs["train"] == 0:
        raise DataError(f"{docs_path}: only {seen} docs but --val-docs is {val_docs}; no docs left for training")
    result = {
        "docs": seen,
        "docs_val": ndocs["val"], "docs_train": ndocs["train"],
        "tokens_val": writers["val"].tokens, "tokens_train": writers["train"].tokens,
        "files_val": writers["val"].files, "files_train": writers["train"].files,
        "files_val_bytes": sidecar.files if sidecar is not None else [],
        "bytes_val": sidecar.total if sidecar is not None else 0,
        "plain_bytes_val": plain_bytes if sp_plain is not None else None,
        "vocab_size": vocab, "bos_id": bos,
    }
    if log:
        log(f"built {out_dir}: val {result['docs_val']} docs / {result['tokens_val']} tokens in "
            f"{len(result['files_val'])} shard(s); train {result['docs_train']} docs / "
            f"{result['tokens_train']} tokens in {len(result['files_train'])} shard(s)"
            + (f"; CaseOps byte sidecar: {result['bytes_val']} bytes in {len(result['files_val_bytes'])} "
               f"file(s)" if caseops else ""))
        if sp_plain is not None:
            log(caseops_ratio_line(result["bytes_val"], plain_bytes, sp_plain.get_piece_size()))
    return result


# --------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------

def hf_fetch(repo_id: str) -> Fetch:
    """A fetch function backed by huggingface_hub (imported lazily)."""

    def fetch(repo_path: str, local_path: Path) -> None:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise DataError("huggingface_hub is not installed (pip install huggingface_hub)") from None
        sub, _, name = repo_path.rpartition("/")
        try:
            cached = Path(hf_hub_download(repo_id=repo_id, filename=name, subfolder=sub or None,
                                          repo_type="dataset")).resolve(strict=True)
        except Exception as e:  # network, auth, offline mode, missing file: one clear line, not a traceback
            raise DataError(f"could not fetch {repo_path} from the Hugging Face dataset {repo_id} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the "
                            f"network, HF_TOKEN and HF_HUB_OFFLINE, or stage the files and pass --mirror "
                            f"(FINEWEB_MIRROR)") from None
        # Hard-link out of the HF cache when possible (no second copy on disk).
        try:
            os.link(cached, local_path)
        except OSError:
            import shutil
            shutil.copyfile(cached, local_path)

    return fetch


def mirror_fetch(root: str | os.PathLike) -> Fetch:
    """A fetch function copying from a local folder laid out like the HF repository
    (for pre-staged data on a pod, and for tests)."""
    root = Path(root)

    def fetch(repo_path: str, local_path: Path) -> None:
        src = root.joinpath(*repo_path.split("/"))
        if not src.is_file():
            raise DataError(f"{src}: not found in mirror {root}; a mirror is laid out like the published "
                            f"export ({REMOTE_ROOT_PREFIX}/manifest.json, {REMOTE_ROOT_PREFIX}/datasets/..., "
                            f"{REMOTE_ROOT_PREFIX}/tokenizers/...)")
        import shutil
        shutil.copyfile(src, local_path)

    return fetch


def _expected_ok(path: Path, size: int | None) -> bool:
    """True when ``path`` is already complete: right size if known, else a valid shard / non-empty file."""
    if not path.is_file():
        return False
    actual = path.stat().st_size
    if size is not None:
        return actual == size
    if path.suffix == ".bin":
        try:
            read_shard_header(path)
            return True
        except DataError:
            return False
    return actual > 0


def fetch_file(fetch: Fetch, repo_path: str, local_path: Path, size: int | None = None,
               log: Callable[[str], None] | None = None) -> bool:
    """Fetch one file atomically (tmp + rename). Returns False when it was already present."""
    if _expected_ok(local_path, size):
        return False
    local_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in local_path.parent.glob(f".{local_path.name}.*.part"):  # left by a killed run
        stale.unlink(missing_ok=True)
    tmp = _atomic_tmp(local_path)
    try:
        fetch(repo_path, tmp)
        if not tmp.is_file():
            raise DataError(f"{local_path}: fetch of {repo_path} produced no file")
        if size is not None and tmp.stat().st_size != size:
            raise DataError(f"{local_path}: downloaded {tmp.stat().st_size} bytes, expected {size}")
        if local_path.suffix == ".bin":
            read_shard_header(tmp)
        os.replace(tmp, local_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if log:
        log(f"fetched {local_path}")
    return True


def _local_for(repo_path: str, prefix: str, out: Path) -> Path:
    rel = repo_path[len(prefix) + 1:] if prefix and repo_path.startswith(prefix + "/") else repo_path
    return out.joinpath(*rel.split("/"))


def download(variant: str, train_shards: int, out: str | os.PathLike = "data",
             fetch: Fetch | None = None, repo_id: str | None = None, prefix: str | None = None,
             workers: int = 1, log: Callable[[str], None] | None = None) -> dict:
    """Download ``variant``'s val shards, the first ``train_shards`` train shards and its tokenizer.

    ``fetch(repo_path, local_path)`` writes the repository file ``repo_path`` to ``local_path``;
    by default it is backed by huggingface_hub.  Files already present and complete are skipped;
    each file is written to a temporary name and renamed, so an interrupted run never leaves a
    truncated file in place.  Returns {"fetched": [...], "skipped": [...], "dataset_dir", "tokenizer"}.
    """
    if variant not in VARIANTS:
        raise DataError(f"unknown variant {variant!r} (choose from {', '.join(sorted(VARIANTS))})")
    if train_shards < 0:
        raise DataError(f"--train-shards must be >= 0, got {train_shards}")
    spec = VARIANTS[variant]
    repo_id = repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or spec["repo_id"]
    prefix = REMOTE_ROOT_PREFIX if prefix is None else prefix
    prefix = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", prefix).strip("/")
    out = Path(out)
    fetch = fetch or hf_fetch(repo_id)
    join = (lambda p: f"{prefix}/{p}") if prefix else (lambda p: p)
    fetched: list[Path] = []
    skipped: list[Path] = []

    # The manifest lists shard counts and tokenizer artifacts.  A manifest cached from another
    # repository may not list this variant: re-fetch once in that case.
    manifest_local = out / "manifest.json"
    entry = None
    fresh = False
    while True:
        if not manifest_local.is_file():
            fetch_file(fetch, join("manifest.json"), manifest_local, log=log)
            fresh = True
        try:
            manifest = json.loads(manifest_local.read_text(encoding="utf-8"))
            entry = next((d for d in manifest.get("datasets", []) if d.get("name") == spec["dataset"]), None)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            if fresh:
                raise DataError(f"{manifest_local}: invalid manifest ({e})") from None
            entry = None
        if entry is not None or fresh:
            break
        manifest_local.unlink()  # stale or from another repository: fetch it again
    if entry is None:
        raise DataError(f"{manifest_local}: dataset {spec['dataset']} not listed (repo {repo_id})")
    stats = entry.get("stats") or {}
    try:
        n_train_avail = int(stats["files_train"])
        n_val = int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{manifest_local}: dataset {spec['dataset']} lacks stats.files_train/files_val") from None
    if train_shards > n_train_avail:
        raise DataError(f"{variant}: only {n_train_avail} train shards in {repo_id}, requested {train_shards}")
    tok_name = entry.get("tokenizer_name") or spec["tokenizer"]
    tok_entry = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tok_name), None) or {}
    tok_files = [str(tok_entry[k]) for k in ("model_path", "vocab_path", "path") if tok_entry.get(k)]
    if not tok_files:
        tok_files = [f"tokenizers/{spec['tokenizer']}.model", f"tokenizers/{spec['tokenizer']}.vocab"]
    sizes = entry.get("file_sizes") or {}  # optional {name: bytes}; shards are self-checking anyway

    ds = f"datasets/{spec['dataset']}"
    wanted = [f"{ds}/{shard_name('val', i)}" for i in range(n_val)]
    if spec.get("val_bytes") or entry.get("val_bytes_glob"):  # CaseOps: one byte sidecar per val shard
        wanted += [f"{ds}/{shard_name('val_bytes', i)}" for i in range(n_val)]
    wanted += [f"{ds}/{shard_name('train', i)}" for i in range(train_shards)]
    wanted += tok_files

    def one(rel: str) -> tuple[Path, bool | None]:
        local = _local_for(join(rel), prefix, out)
        size = sizes.get(rel.rsplit("/", 1)[-1])
        try:
            return local, fetch_file(fetch, join(rel), local, None if size is None else int(size), log)
        except DataError as e:
            if not rel.endswith(".vocab"):  # the .vocab is a human-readable extra: nothing reads it
                raise
            if log:
                log(f"note: optional tokenizer file not fetched ({e})")
            return local, None

    if workers <= 1:
        results = [one(rel) for rel in wanted]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, wanted))
    for local, did in results:
        if did is not None:
            (fetched if did else skipped).append(local)
    model = next((p for p in tok_files if p.endswith(".model")), tok_files[0])
    return {"fetched": fetched, "skipped": skipped, "dataset_dir": out / ds,
            "tokenizer": _local_for(join(model), prefix, out), "repo_id": repo_id}


# --------------------------------------------------------------------------------------
# check: shard validation + the validation/train leak guard
# --------------------------------------------------------------------------------------

_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def doc_prefix_keys(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, k: int) -> np.ndarray:
    """64-bit keys of documents tokens[starts[i]:ends[i]]: a hash of their first min(len, k) tokens and of
    that length, so a document shorter than k only matches a document equal to it as a whole."""
    starts = np.asarray(starts, dtype=np.int64)
    lens = np.minimum(np.asarray(ends, dtype=np.int64) - starts, k)
    with np.errstate(over="ignore"):
        h = _mix64(lens.astype(np.uint64) + np.uint64(0x632BE59BD9B4E019))
        if starts.size and tokens.size:
            last = tokens.size - 1
            for j in range(k):  # Horner over the k columns; positions past a document's end count as 0
                col = tokens[np.minimum(starts + j, last)].astype(np.uint64) + np.uint64(1)
                h = h * _HASH_MUL + np.where(j < lens, col, np.uint64(0))
        return _mix64(h)


def _doc_bounds(tokens: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Content [start, end) of each document: from after its BOS to the next BOS or the end."""
    bos = np.flatnonzero(tokens == bos_id)
    return bos + 1, np.append(bos[1:], tokens.size).astype(np.int64)


def _infer_vocab(data_dir: Path) -> tuple[int | None, str]:
    for spec in VARIANTS.values():
        if data_dir.name == spec["dataset"]:
            return spec["vocab"], f"the {spec['dataset']} export"
    for manifest in (data_dir.parent.parent / "manifest.json", data_dir.parent / "manifest.json"):
        try:
            entries = json.loads(manifest.read_text(encoding="utf-8")).get("datasets", [])
            entry = next((d for d in entries if d.get("name") == data_dir.name and d.get("vocab_size")), None)
        except (OSError, ValueError, AttributeError):
            continue
        if entry is not None:
            return int(entry["vocab_size"]), str(manifest)
    m = re.search(r"_sp(\d+)(?:_|$)", data_dir.name)
    if m:
        return int(m.group(1)), f"the folder name {data_dir.name}"
    return None, "unknown"


def check_data(data_dir: str | os.PathLike, vocab_size: int | None = None, bos_id: int = 1,
               prefix_tokens: int = 32, min_doc_tokens: int = 16, require_sidecar: bool = False,
               workers: int | None = None, log: Callable[[str], None] | None = None,
               plain_tokenizer: str | os.PathLike | None = None,
               caseops_tokenizer: str | os.PathLike | None = None) -> dict:
    """Validate a shard folder and look for validation documents inside the training shards.

    Every fineweb_{train,val,val_bytes}_NNNNNN.bin must have a valid header and a size matching its
    token count; token ids must be < ``vocab_size`` (given, or inferred from the folder: a known
    export, a manifest.json entry, or "_sp<N>" in the name; skipped when unknown).  The byte sidecars,
    when present (or ``require_sidecar``), must pair one-to-one with the val shards with equal token
    counts and 0 at every BOS.  Format problems raise DataError.

    Leak guard: the validation stream is split into documents at ``bos_id``; each document with at
    least ``min_doc_tokens`` tokens is keyed by ``doc_prefix_keys`` (first ``prefix_tokens`` tokens).
    Every training document (from a BOS; shards are scanned in parallel, memory-mapped) whose key
    matches is compared token by token with the candidate validation documents.  A document cut by the
    end of its shard is joined with the head of the following shard(s) first; one cut by the end of the
    last shard present counts when it equals the start of a validation document.

    With ``plain_tokenizer`` (CaseOps data only) the validation documents are decoded back to text with
    ``caseops_tokenizer`` (default: the CaseOps model beside the plain one) and counted by the plain
    tokenizer's official byte table (``plain_table_bytes``), for the plain-table / sidecar byte ratio.
    Returns a dict: train_shards, val_shards, train_tokens, val_tokens, val_docs, val_docs_checked,
    sidecar_bytes (None without a sidecar), plain_bytes (None without ``plain_tokenizer``), vocab_size,
    leaked_docs (distinct validation documents found), leaked_by_shard ({file name: documents}),
    leaked_examples (up to 5 (val doc, shard, position)), seconds.
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    if prefix_tokens < 1:
        raise DataError(f"--prefix-tokens must be >= 1, got {prefix_tokens}")
    shards = list_shards(data_dir)
    if not shards["val"]:
        raise DataError(f"{data_dir}: no validation shards (fineweb_val_NNNNNN.bin)")
    if not shards["train"]:
        raise DataError(f"{data_dir}: no training shards (fineweb_train_NNNNNN.bin)")
    vocab_source = "--vocab-size"
    if vocab_size is None:
        vocab_size, vocab_source = _infer_vocab(data_dir)

    def check_ids(path: Path, arr: np.ndarray) -> None:
        if vocab_size is not None and arr.size:
            top = int(arr.max())
            if top >= vocab_size:
                raise DataError(f"{path}: token id {top} >= vocab size {vocab_size} (from {vocab_source})")

    # validation stream + sidecars
    val_parts = []
    for p in shards["val"]:
        arr = read_shard(p)
        check_ids(p, arr)
        val_parts.append(arr)
    val = np.concatenate(val_parts)
    sidecar_bytes = None
    if shards["val_bytes"] or require_sidecar:
        val_names = [p.name.replace("fineweb_val_", "fineweb_val_bytes_") for p in shards["val"]]
        side_names = [p.name for p in shards["val_bytes"]]
        if side_names != val_names:
            missing = sorted(set(val_names) - set(side_names)) or sorted(set(side_names) - set(val_names))
            raise DataError(f"{data_dir}: byte sidecars do not pair with the val shards "
                            f"({len(side_names)} sidecar(s) for {len(val_names)} val shard(s); "
                            f"unpaired: {', '.join(missing[:3])})")
        sidecar_bytes = 0
        for p, toks in zip(shards["val_bytes"], val_parts):
            nb = read_shard(p)
            if nb.size != toks.size:
                raise DataError(f"{p}: {nb.size} byte counts for {toks.size} tokens in the val shard")
            at_bos = nb[toks == bos_id]
            if at_bos.any():
                raise DataError(f"{p}: {int((at_bos != 0).sum())} BOS token(s) with a non-zero byte count")
            sidecar_bytes += int(nb.sum(dtype=np.int64))
    plain_bytes = None
    if plain_tokenizer is not None:
        if sidecar_bytes is None:
            raise DataError(f"{data_dir}: the plain-table byte ratio needs CaseOps data with its byte "
                            f"sidecar (no fineweb_val_bytes_NNNNNN.bin here)")
        sp_plain = load_tokenizer(plain_tokenizer)
        caseops_tokenizer = Path(caseops_tokenizer or Path(plain_tokenizer).parent / CASEOPS_TOKENIZER)
        if not caseops_tokenizer.is_file():
            raise DataError(f"{caseops_tokenizer}: CaseOps tokenizer not found (needed to decode the "
                            f"validation documents; pass --caseops-tokenizer)")
        threads = workers or max(1, min(8, os.cpu_count() or 1))
        texts = caseops_texts(load_tokenizer(caseops_tokenizer), val, bos_id, threads)
        plain_bytes = plain_table_bytes(sp_plain, texts, threads)
        if log:
            log(caseops_ratio_line(sidecar_bytes, plain_bytes, sp_plain.get_piece_size()))

    starts, ends = _doc_bounds(val, bos_id)
    keep = (ends - starts) >= max(1, min_doc_tokens)
    vstarts, vends = starts[keep], ends[keep]
    vkeys = doc_prefix_keys(val, vstarts, vends, prefix_tokens)
    order = np.argsort(vkeys, kind="stable")
    skeys = vkeys[order]

    train_paths = shards["train"]

    def continuation(i: int) -> tuple[list[np.ndarray], bool]:
        """Tokens at the head of shards i, i+1, ... before their first BOS (the rest of a document cut by
        the end of shard i-1); the flag says whether the document's end was seen."""
        parts = []
        for path in train_paths[i:]:
            arr = read_shard(path, mmap=True)
            step = 1 << 16
            for off in range(0, arr.size, step):
                hit = np.flatnonzero(arr[off:off + step] == bos_id)
                if hit.size:
                    parts.append(np.asarray(arr[:off + int(hit[0])]))
                    return parts, True
            parts.append(np.asarray(arr))
        return parts, False

    def matches(doc: np.ndarray, key: np.uint64, complete: bool) -> list[int]:
        lo, hi = np.searchsorted(skeys, key, side="left"), np.searchsorted(skeys, key, side="right")
        out = []
        for vi in order[lo:hi].tolist():
            vdoc = val[vstarts[vi]:vends[vi]]
            if np.array_equal(doc, vdoc) or (not complete and doc.size <= vdoc.size
                                              and np.array_equal(doc, vdoc[:doc.size])):
                out.append(vi)
        return out

    def scan(i: int) -> tuple[str, int, int, list[tuple[int, int]]]:
        path = train_paths[i]
        arr = read_shard(path, mmap=True)
        check_ids(path, arr)
        if not skeys.size:
            return path.name, arr.size, 0, []
        tstarts, tends = _doc_bounds(arr, bos_id)
        keys = doc_prefix_keys(arr, tstarts, tends, prefix_tokens)
        lo = np.searchsorted(skeys, keys, side="left")
        hi = np.searchsorted(skeys, keys, side="right")
        found = []
        last = tstarts.size - 1
        for d in np.flatnonzero(hi > lo).tolist():
            if d != last or tends[d] < arr.size:
                doc = np.asarray(arr[tstarts[d]:tends[d]])
                found += [(vi, int(tstarts[d]) - 1) for vi in matches(doc, keys[d], True)]
        if last >= 0 and tends[last] == arr.size:  # the last document runs into the next shard(s): join it
            parts, complete = continuation(i + 1)
            doc = np.concatenate([np.asarray(arr[tstarts[last]:])] + parts)
            key = doc_prefix_keys(doc, np.zeros(1, np.int64), np.array([doc.size]), prefix_tokens)[0]
            found += [(vi, int(tstarts[last]) - 1) for vi in matches(doc, key, complete)]
        return path.name, arr.size, tstarts.size, found

    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if workers == 1:
        scanned = [scan(i) for i in range(len(train_paths))]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            scanned = list(pool.map(scan, range(len(train_paths))))

    leaked: set[int] = set()
    by_shard: dict[str, int] = {}
    examples: list[tuple[int, str, int]] = []
    for name, _, _, found in scanned:
        docs = {vi for vi, _ in found}
        if docs:
            by_shard[name] = len(docs)
            leaked |= docs
            examples += [(vi, name, pos) for vi, pos in found[:5 - len(examples)]]
    # report validation documents by their index in the validation stream (0 = first document)
    doc_index = np.flatnonzero(keep)
    result = {
        "train_shards": len(shards["train"]), "val_shards": len(shards["val"]),
        "train_tokens": sum(n for _, n, _, _ in scanned), "val_tokens": int(val.size),
        "train_docs": sum(n for _, _, n, _ in scanned),
        "val_docs": int(starts.size), "val_docs_checked": int(keep.sum()),
        "sidecar_bytes": sidecar_bytes, "plain_bytes": plain_bytes, "vocab_size": vocab_size,
        "leaked_docs": len(leaked), "leaked_by_shard": by_shard,
        "leaked_examples": [(int(doc_index[vi]), name, pos) for vi, name, pos in examples],
        "seconds": time.perf_counter() - t0,
    }
    if log and val.size and val[0] != bos_id:
        log(f"warning: the validation stream does not start with BOS ({bos_id}): "
            f"tokens before the first BOS are not checked")
    return result


def check_summary(r: dict) -> str:
    side = "" if r["sidecar_bytes"] is None else f" val_bytes:{r['sidecar_bytes']}"
    return (f"check: train_shards:{r['train_shards']} train_tokens:{r['train_tokens']} "
            f"val_shards:{r['val_shards']} val_tokens:{r['val_tokens']} val_docs:{r['val_docs']} "
            f"val_docs_checked:{r['val_docs_checked']}{side} "
            f"vocab:{r['vocab_size'] if r['vocab_size'] is not None else 'unchecked'} "
            f"leaked_docs:{r['leaked_docs']} time:{r['seconds']:.1f}s")


# --------------------------------------------------------------------------------------
# Offline smoke corpus + tokenizer
# --------------------------------------------------------------------------------------

PYDOC_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections configparser contextlib copy csv "
    "dataclasses datetime decimal difflib email.message enum fractions functools glob gzip hashlib "
    "heapq hmac html.parser http.client inspect io ipaddress itertools json logging lzma math "
    "mimetypes operator os pathlib pickle pprint queue random re shutil socket sqlite3 statistics "
    "string struct subprocess tarfile tempfile textwrap threading time typing unittest urllib.parse "
    "uuid zipfile zlib"
).split()


def pydoc_docs(doc_chars: int = 4000, modules: Iterable[str] = PYDOC_MODULES) -> list[str]:
    """Documents made of the plain-text pydoc of stdlib modules, cut at blank lines into ~doc_chars pieces."""
    import importlib
    import pydoc
    import warnings

    docs: list[str] = []
    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
                text = pydoc.render_doc(mod, renderer=pydoc.plaintext)
        except Exception:  # a module missing from a trimmed Python build: just skip it
            continue
        cur: list[str] = []
        size = 0
        for line in text.splitlines():
            line = line.rstrip()
            cur.append(line)
            size += len(line) + 1
            if not line.strip(" |") and size >= doc_chars:  # cut only at a (pydoc-)blank line
                docs.append("\n".join(cur).strip("\n"))
                cur, size = [], 0
        if size > 200:
            docs.append("\n".join(cur).strip("\n"))
    return docs


def write_docs_jsonl(path: str | os.PathLike, docs: Iterable[str]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_tmp(path)
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def train_tokenizer(docs_path: str | os.PathLike, model_prefix: str | os.PathLike, vocab_size: int = 1024,
                    max_docs: int | None = None, byte_fallback: bool = False) -> Path:
    """Train a SentencePiece BPE model with the challenge tokenizer's settings.

    Matches fineweb_1024_bpe.model: BPE, pad=0 bos=1 eos=2 unk=3, nmt_nfkc normalization,
    no dummy prefix, split_digits, character_coverage 0.999, no byte fallback (the sp8192
    challenge model does use byte fallback: pass byte_fallback=True to mimic it).
    """
    import sentencepiece as spm

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)

    def lines() -> Iterator[str]:
        for text in iter_docs(docs_path, max_docs):
            for line in text.split("\n"):
                line = line.strip()
                if line:
                    yield line[:4000]

    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=str(model_prefix), model_type="bpe",
        vocab_size=vocab_size, character_coverage=0.999, split_digits=True,
        byte_fallback=byte_fallback, add_dummy_prefix=False, normalization_rule_name="nmt_nfkc",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        num_threads=max(1, min(8, os.cpu_count() or 1)), minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fineweb.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("download", help="download challenge shards + tokenizer from Hugging Face")
    d.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024")
    d.add_argument("--train-shards", type=int, default=80)
    d.add_argument("--out", default=str(Path(__file__).resolve().parent),
                   help="data root (gets datasets/ and tokenizers/); default: this script's folder")
    d.add_argument("--repo-id", default=None, help="HF dataset repo (env MATCHED_FINEWEB_REPO_ID)")
    d.add_argument("--workers", type=int, default=8, help="parallel downloads")
    d.add_argument("--mirror", default=os.environ.get("FINEWEB_MIRROR"),
                   help="copy from this local folder (same layout as the HF repo) instead of "
                        "downloading (env FINEWEB_MIRROR)")

    b = sub.add_parser("build", help="tokenize docs.jsonl[.xz] into shards")
    b.add_argument("--docs", required=True)
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--val-docs", type=int, default=CHALLENGE_VAL_DOCS,
                   help=f"the first N docs form the validation split (default {CHALLENGE_VAL_DOCS}, the "
                        f"challenge's scored set; fewer puts scored docs into the train shards)")
    b.add_argument("--max-docs", type=int, default=None)
    b.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    b.add_argument("--caseops", action="store_true",
                   help="apply the lossless_caps_caseops_v1 transform before tokenizing (use the CaseOps "
                        "tokenizer) and write the validation byte sidecar fineweb_val_bytes_NNNNNN.bin")
    b.add_argument("--exact-bytes", action="store_true",
                   help="with --caseops: also count the characters SentencePiece drops at document edges "
                        "(leading/trailing whitespace, BOM), so the sidecar sums to the full UTF-8 size; "
                        "default is the published export's rule (they count 0)")
    b.add_argument("--plain-tokenizer", default=None,
                   help=f"with --caseops: the plain tokenizer, to print the plain-table / sidecar byte ratio "
                        f"of the validation set (default: {PLAIN_TOKENIZER} beside --tokenizer; skipped "
                        f"when absent)")

    k = sub.add_parser("check", help="validate a shard folder and verify no validation doc is in a train shard")
    k.add_argument("data_dir")
    k.add_argument("--vocab-size", type=int, default=None,
                   help="token ids must be below this (default: inferred from the folder, else unchecked)")
    k.add_argument("--bos-id", type=int, default=1)
    k.add_argument("--prefix-tokens", type=int, default=32, help="tokens hashed per document")
    k.add_argument("--min-doc-tokens", type=int, default=16,
                   help="validation documents shorter than this are not looked for (default 16: a few-word "
                        "document can recur by chance)")
    k.add_argument("--require-sidecar", action="store_true",
                   help="fail unless every val shard has its fineweb_val_bytes_NNNNNN.bin (CaseOps)")
    k.add_argument("--max-leaked", type=int, default=0,
                   help="tolerate up to N validation documents found in training shards (default 0)")
    k.add_argument("--workers", type=int, default=None, help="training shards scanned in parallel")
    k.add_argument("--plain-ratio", metavar="PLAIN_TOKENIZER", default=None,
                   help=f"CaseOps data: decode the validation documents and print the bytes the official "
                        f"scorer counts for them with this plain tokenizer ({PLAIN_TOKENIZER}) against the "
                        f"sidecar's")
    k.add_argument("--caseops-tokenizer", default=None,
                   help=f"with --plain-ratio: the CaseOps tokenizer that decodes the validation shards "
                        f"(default: {CASEOPS_TOKENIZER} beside the plain tokenizer)")

    c = sub.add_parser("pydoc-corpus", help="write an offline docs.jsonl from stdlib pydoc text")
    c.add_argument("--out", required=True)
    c.add_argument("--doc-chars", type=int, default=4000)

    t = sub.add_parser("train-tokenizer", help="train a SentencePiece BPE model (challenge settings)")
    t.add_argument("--docs", required=True)
    t.add_argument("--out", required=True, help="model prefix, e.g. data/smoke/tok -> tok.model")
    t.add_argument("--vocab-size", type=int, default=1024)
    t.add_argument("--max-docs", type=int, default=None)
    t.add_argument("--byte-fallback", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def log(msg: str) -> None:
        print(f"fineweb.py: {msg}", flush=True)

    try:
        if args.cmd == "download":
            fetch = mirror_fetch(args.mirror) if args.mirror else None
            r = download(args.variant, args.train_shards, args.out, fetch=fetch, repo_id=args.repo_id,
                         workers=args.workers, log=log)
            log(f"done: {len(r['fetched'])} fetched, {len(r['skipped'])} already present "
                f"({r['dataset_dir']}, {r['tokenizer']})")
        elif args.cmd == "build":
            for flag in ("exact_bytes", "plain_tokenizer"):
                if getattr(args, flag) and not args.caseops:
                    raise DataError(f"--{flag.replace('_', '-')} only applies with --caseops")
            plain = args.plain_tokenizer or Path(args.tokenizer).parent / PLAIN_TOKENIZER
            build_shards(args.docs, args.tokenizer, args.out, args.val_docs, args.max_docs,
                         args.shard_tokens, log=log, caseops=args.caseops, exact_bytes=args.exact_bytes,
                         plain_tokenizer=plain if args.caseops else None)
        elif args.cmd == "check":
            r = check_data(args.data_dir, vocab_size=args.vocab_size, bos_id=args.bos_id,
                           prefix_tokens=args.prefix_tokens, min_doc_tokens=args.min_doc_tokens,
                           require_sidecar=args.require_sidecar, workers=args.workers, log=log,
                           plain_tokenizer=args.plain_ratio, caseops_tokenizer=args.caseops_tokenizer)
            print(check_summary(r), flush=True)
            if r["leaked_docs"] > args.max_leaked:
                for name, n in sorted(r["leaked_by_shard"].items()):
                    log(f"leak: {name} holds {n} validation document(s)")
                for vi, name, pos in r["leaked_examples"]:
                    log(f"leak: validation document #{vi} found in {name} at token {pos}")
                shards = ", ".join(f"{name} ({n})" for name, n in sorted(r["leaked_by_shard"].items()))
                raise DataError(
                    f"{args.data_dir}: {r['leaked_docs']} of {r['val_docs']} validation documents also occur in "
                    f"training shards: {shards}; the validation split leaks into training (built with fewer "
                    f"--val-docs than the {CHALLENGE_VAL_DOCS} scored? challenge issue #2127)")
        elif args.cmd == "pydoc-corpus":
            n = write_docs_jsonl(args.out, pydoc_docs(args.doc_chars))
            if n == 0:
                raise DataError("pydoc produced no documents")
            log(f"wrote {n} docs to {args.out}")
        elif args.cmd == "train-tokenizer":
            model = train_tokenizer(args.docs, args.out, args.vocab_size, args.max_docs, args.byte_fallback)
            log(f"wrote {model}")
    except (DataError, OSError) as e:  # OSError covers network errors from huggingface_hub/requests
        sys.exit(f"fineweb.py {args.cmd}: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"fineweb.py {args.cmd}: interrupted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
