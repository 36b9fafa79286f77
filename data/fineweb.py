#!/usr/bin/env python3
"""FineWeb data tooling for this submission.

Subcommands
-----------
download   fetch the challenge's pre-tokenized shards + tokenizer from Hugging Face into
           data/datasets/fineweb10B_<variant>/ and data/tokenizers/
build      tokenize a docs.jsonl[.xz] file with a SentencePiece model into shards
pydoc-corpus
           write a small offline docs.jsonl made of the installed Python's stdlib pydoc text
train-tokenizer
           train a SentencePiece BPE model with the challenge tokenizer's settings

Shard format (the challenge's): 256 little-endian int32 header words
(magic 20240520, version 1, token count, then zeros) followed by the tokens as uint16.
Every document starts with the tokenizer's BOS id (1 for the challenge tokenizers); no EOS.

Library use (tests, trainer tests): ``write_shard``, ``read_shard``, ``build_shards``,
``download``, ``iter_docs``, ``pydoc_docs``, ``train_tokenizer``.  Input problems raise
``DataError`` (a ``ValueError`` subclass) whose message names the offending file.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import gzip
import os
import sys
import threading
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
}

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
    return f"fineweb_{split}_{index:06d}.bin"


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
        self.fill = 0


def build_shards(docs_path: str | os.PathLike, tokenizer_path: str | os.PathLike,
                 out_dir: str | os.PathLike, val_docs: int, max_docs: int | None = None,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, batch_docs: int = 256,
                 log: Callable[[str], None] | None = None) -> dict:
    """Tokenize docs into val shards (first ``val_docs`` docs) and train shards (the rest).

    Existing fineweb_{train,val}_*.bin files in ``out_dir`` are removed first so the
    directory always holds exactly one consistent build.  Returns a dict with
    docs, docs_val, docs_train, tokens_val, tokens_train, files_val, files_train
    (lists of paths), vocab_size and bos_id.
    """
    docs_path, tokenizer_path, out_dir = Path(docs_path), Path(tokenizer_path), Path(out_dir)
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

    writers = {s: _ShardWriter(out_dir, s, shard_tokens) for s in ("val", "train")}
    ndocs = {"val": 0, "train": 0}

    def encode_batch(texts: list[str], first_index: int) -> None:
        for i, ids in enumerate(sp.encode(texts)):
            split = "val" if first_index + i < val_docs else "train"
            arr = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)
            arr[0] = bos
            arr[1:] = ids
            writers[split].add(arr)
            ndocs[split] += 1

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

    if seen == 0:
        raise DataError(f"{docs_path}: no documents found")
    if ndocs["train"] == 0:
        raise DataError(f"{docs_path}: only {seen} docs but --val-docs is {val_docs}; no docs left for training")
    result = {
        "docs": seen,
        "docs_val": ndocs["val"], "docs_train": ndocs["train"],
        "tokens_val": writers["val"].tokens, "tokens_train": writers["train"].tokens,
        "files_val": writers["val"].files, "files_train": writers["train"].files,
        "vocab_size": vocab, "bos_id": bos,
    }
    if log:
        log(f"built {out_dir}: val {result['docs_val']} docs / {result['tokens_val']} tokens in "
            f"{len(result['files_val'])} shard(s); train {result['docs_train']} docs / "
            f"{result['tokens_train']} tokens in {len(result['files_train'])} shard(s)")
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
    wanted += [f"{ds}/{shard_name('train', i)}" for i in range(train_shards)]
    wanted += tok_files

    def one(rel: str) -> tuple[Path, bool]:
        local = _local_for(join(rel), prefix, out)
        size = sizes.get(rel.rsplit("/", 1)[-1])
        return local, fetch_file(fetch, join(rel), local, None if size is None else int(size), log)

    if workers <= 1:
        results = [one(rel) for rel in wanted]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, wanted))
    for local, did in results:
        (fetched if did else skipped).append(local)
    model = next((p for p in tok_files if p.endswith(".model")), tok_files[0])
    return {"fetched": fetched, "skipped": skipped, "dataset_dir": out / ds,
            "tokenizer": _local_for(join(model), prefix, out), "repo_id": repo_id}


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
    b.add_argument("--val-docs", type=int, required=True)
    b.add_argument("--max-docs", type=int, default=None)
    b.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)

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
            build_shards(args.docs, args.tokenizer, args.out, args.val_docs, args.max_docs,
                         args.shard_tokens, log=log)
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
