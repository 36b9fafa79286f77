"""Tests for data/fineweb.py: shard format, building shards, downloading with an injected fetch."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpus" / "docs_en.jsonl.xz"
SP1024 = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
FINEWEB_PY = REPO / "data" / "fineweb.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("fineweb", FINEWEB_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fineweb"] = mod
    spec.loader.exec_module(mod)
    return mod


fw = _load_module()


def need_shared():
    if not CORPUS.is_file() or not SP1024.is_file():
        pytest.skip(f"shared corpus/tokenizer not available under {SHARED}")


def first_docs(n):
    return list(fw.iter_docs(CORPUS, max_docs=n))


# ----------------------------------------------------------------------------- shard format

def test_shard_roundtrip_and_header(tmp_path):
    toks = np.array([1, 5, 65535, 0, 1023], dtype=np.int64)
    p = tmp_path / "fineweb_val_000000.bin"
    assert fw.write_shard(p, toks) == 5
    raw = p.read_bytes()
    assert len(raw) == 256 * 4 + 5 * 2
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and header[2] == 5
    assert not header[3:].any()
    got = fw.read_shard(p)
    assert got.dtype == np.uint16
    assert got.tolist() == toks.tolist()
    assert fw.read_shard(p, mmap=True).tolist() == toks.tolist()
    assert not list(tmp_path.glob(".*.part"))


def test_write_shard_empty_and_bad_ids(tmp_path):
    p = tmp_path / "empty.bin"
    fw.write_shard(p, [])
    assert fw.read_shard(p).size == 0
    with pytest.raises(ValueError, match="bad.bin"):
        fw.write_shard(tmp_path / "bad.bin", [1, 70000])
    with pytest.raises(ValueError, match="neg.bin"):
        fw.write_shard(tmp_path / "neg.bin", [-1, 2])


@pytest.mark.parametrize("damage", ["magic", "version", "truncated", "tiny", "missing"])
def test_read_shard_rejects_damage(tmp_path, damage):
    p = tmp_path / "fineweb_train_000000.bin"
    fw.write_shard(p, np.arange(100))
    raw = bytearray(p.read_bytes())
    if damage == "magic":
        raw[0:4] = np.int32(1234).tobytes()
    elif damage == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif damage == "truncated":
        raw = raw[:-2]
    elif damage == "tiny":
        raw = raw[:100]
    p.write_bytes(bytes(raw))
    if damage == "missing":
        p.unlink()
    with pytest.raises(ValueError, match="fineweb_train_000000.bin"):
        fw.read_shard(p)


# ----------------------------------------------------------------------------- build

N_DOCS, N_VAL, SHARD_TOKENS = 120, 20, 50_000


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    need_shared()
    out = tmp_path_factory.mktemp("built") / "fineweb10B_sp1024"
    out.mkdir()
    fw.write_shard(out / "fineweb_train_000099.bin", [1, 2, 3])  # stale, must disappear
    res = fw.build_shards(CORPUS, SP1024, out, val_docs=N_VAL, max_docs=N_DOCS, shard_tokens=SHARD_TOKENS)
    return out, res


def test_build_counts(built):
    out, res = built
    assert res["docs"] == N_DOCS
    assert res["docs_val"] == N_VAL and res["docs_train"] == N_DOCS - N_VAL
    assert res["vocab_size"] == 1024 and res["bos_id"] == 1
    assert not (out / "fineweb_train_000099.bin").exists()
    assert sorted(p.name for p in out.glob("fineweb_val_*.bin")) == [p.name for p in res["files_val"]]
    assert sorted(p.name for p in out.glob("fineweb_train_*.bin")) == [p.name for p in res["files_train"]]
    assert len(res["files_train"]) >= 2  # small shard size forces several train shards
    for split in ("val", "train"):
        files = res[f"files_{split}"]
        assert [p.name for p in files] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(files))]
        sizes = [fw.read_shard(p).size for p in files]
        assert all(s == SHARD_TOKENS for s in sizes[:-1]) and 0 < sizes[-1] <= SHARD_TOKENS
        assert sum(sizes) == res[f"tokens_{split}"]


def test_build_content_matches_sentencepiece(built):
    import sentencepiece as spm

    out, res = built
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    docs = first_docs(N_DOCS)
    for split, chunk in (("val", docs[:N_VAL]), ("train", docs[N_VAL:])):
        got = np.concatenate([fw.read_shard(p) for p in res[f"files_{split}"]])
        expected = np.concatenate([np.array([1] + ids, dtype=np.uint16) for ids in sp.encode(chunk)])
        assert np.array_equal(got, expected)
        assert int((got == 1).sum()) == len(chunk)  # exactly one BOS per document
        assert got[0] == 1
        assert int((got == 2).sum()) == 0  # no EOS
        assert int(got.max()) < 1024


def test_build_cli(tmp_path):
    need_shared()
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, str(FINEWEB_PY), "build", "--docs", str(CORPUS), "--tokenizer",
                        str(SP1024), "--out", str(out), "--val-docs", "3", "--max-docs", "10"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "val 3 docs" in r.stdout and "train 7 docs" in r.stdout
    assert (out / "fineweb_val_000000.bin").is_file() and (out / "fineweb_train_000000.bin").is_file()


def test_build_plain_jsonl_and_gz(tmp_path):
    need_shared()
    import gzip

    docs = ["Hello world.", "Second document\nwith two lines.", "Third one: 42."]
    plain = tmp_path / "d.jsonl"
    plain.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n\n", encoding="utf-8")
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(plain.read_text(encoding="utf-8"))
    a = fw.build_shards(plain, SP1024, tmp_path / "a", val_docs=1)
    b = fw.build_shards(gz, SP1024, tmp_path / "b", val_docs=1)
    assert a["docs"] == b["docs"] == 3
    assert np.array_equal(fw.read_shard(a["files_train"][0]), fw.read_shard(b["files_train"][0]))


# ----------------------------------------------------------------------------- bad inputs

def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_docs_file(tmp_path):
    need_shared()
    with pytest.raises(ValueError, match="nope.jsonl"):
        fw.build_shards(tmp_path / "nope.jsonl", SP1024, tmp_path / "out", val_docs=1)


def test_bad_json_line_reports_line_number(tmp_path):
    need_shared()
    p = _write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        fw.build_shards(p, SP1024, tmp_path / "out", val_docs=1)


def test_missing_text_field(tmp_path):
    need_shared()
    p = _write(tmp_path / "notext.jsonl", '{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"notext\.jsonl:2:.*text"):
        fw.build_shards(p, SP1024, tmp_path / "out", val_docs=1)


def test_missing_and_invalid_tokenizer(tmp_path):
    docs = _write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="missing.model"):
        fw.build_shards(docs, tmp_path / "missing.model", tmp_path / "out", val_docs=1)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="junk.model"):
        fw.build_shards(docs, junk, tmp_path / "out", val_docs=1)


def test_no_docs_left_for_training(tmp_path):
    need_shared()
    docs = _write(tmp_path / "few.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="few.jsonl"):
        fw.build_shards(docs, SP1024, tmp_path / "out", val_docs=2)


def test_vocab_too_large_for_uint16(tmp_path, monkeypatch):
    class BigVocab:
        def get_piece_size(self):
            return 70000

        def bos_id(self):
            return 1

    docs = _write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    monkeypatch.setattr(fw, "load_tokenizer", lambda path: BigVocab())
    with pytest.raises(ValueError, match="big.model.*70000"):
        fw.build_shards(docs, tmp_path / "big.model", tmp_path / "out", val_docs=1)


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(FINEWEB_PY), "build", "--docs", str(tmp_path / "absent.jsonl"),
                        "--tokenizer", str(tmp_path / "t.model"), "--out", str(tmp_path / "o"),
                        "--val-docs", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "absent.jsonl" in lines[0] and "error" in lines[0]


# ----------------------------------------------------------------------------- download

PREFIX = "datasets"  # the published export's root (the challenge's cached_challenge_fineweb.py default)


def make_hub(root: Path, datasets=(("fineweb10B_sp1024", "fineweb_1024_bpe", 3),)) -> Path:
    """A fake HF dataset repository on disk."""
    base = root / PREFIX
    manifest = {"datasets": [], "tokenizers": []}
    rng = np.random.default_rng(0)
    for ds, tok, n_train in datasets:
        manifest["datasets"].append({"name": ds, "tokenizer_name": tok,
                                     "stats": {"files_train": n_train, "files_val": 1}})
        manifest["tokenizers"].append({"name": tok, "model_path": f"tokenizers/{tok}.model",
                                       "vocab_path": f"tokenizers/{tok}.vocab"})
        for split, n in (("val", 1), ("train", n_train)):
            for i in range(n):
                fw.write_shard(base / "datasets" / ds / f"fineweb_{split}_{i:06d}.bin",
                               rng.integers(0, 1024, size=500 + 100 * i))
        (base / "tokenizers").mkdir(parents=True, exist_ok=True)
        (base / "tokenizers" / f"{tok}.model").write_bytes(b"model-bytes-" + tok.encode())
        (base / "tokenizers" / f"{tok}.vocab").write_text(f"vocab of {tok}\n")
    (base / "manifest.json").write_text(json.dumps(manifest))
    return root


class HubFetch:
    """Injected fetch: copies from the fake hub and records what was asked for."""

    def __init__(self, hub: Path, fail_on: str | None = None):
        self.hub, self.fail_on, self.calls = hub, fail_on, []

    def __call__(self, repo_path: str, local_path: Path) -> None:
        self.calls.append(repo_path)
        data = (self.hub / repo_path).read_bytes()
        if self.fail_on and repo_path.endswith(self.fail_on):
            local_path.write_bytes(data[: len(data) // 2])  # half written, then the "network" dies
            raise ConnectionError(f"simulated failure fetching {repo_path}")
        local_path.write_bytes(data)


def test_download_layout_and_skip(tmp_path):
    hub = make_hub(tmp_path / "hub")
    out = tmp_path / "data"
    fetch = HubFetch(hub)
    res = fw.download("sp1024", 2, out=out, fetch=fetch)
    ds = out / "datasets" / "fineweb10B_sp1024"
    expected = {
        out / "manifest.json",
        ds / "fineweb_val_000000.bin", ds / "fineweb_train_000000.bin", ds / "fineweb_train_000001.bin",
        out / "tokenizers" / "fineweb_1024_bpe.model", out / "tokenizers" / "fineweb_1024_bpe.vocab",
    }
    assert {p for p in out.rglob("*") if p.is_file()} == expected
    assert not (ds / "fineweb_train_000002.bin").exists()
    for p in expected:
        assert p.read_bytes() == (hub / PREFIX / p.relative_to(out)).read_bytes()
    assert set(res["fetched"]) == expected - {out / "manifest.json"}
    assert res["dataset_dir"] == ds and res["tokenizer"] == out / "tokenizers" / "fineweb_1024_bpe.model"
    assert all(c.startswith(PREFIX + "/") for c in fetch.calls)

    # second run: everything present -> nothing fetched
    again = HubFetch(hub)
    res2 = fw.download("sp1024", 2, out=out, fetch=again)
    assert again.calls == [] and res2["fetched"] == [] and len(res2["skipped"]) == 5

    # more shards: only the new one is fetched; a truncated local shard is fetched again
    (ds / "fineweb_train_000000.bin").write_bytes((ds / "fineweb_train_000000.bin").read_bytes()[:-10])
    more = HubFetch(hub)
    fw.download("sp1024", 3, out=out, fetch=more, workers=3)
    assert sorted(more.calls) == [f"{PREFIX}/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                                  f"{PREFIX}/datasets/fineweb10B_sp1024/fineweb_train_000002.bin"]
    assert fw.read_shard(ds / "fineweb_train_000000.bin").size == 500


def test_download_failure_leaves_no_partial_file(tmp_path):
    hub = make_hub(tmp_path / "hub")
    out = tmp_path / "data"
    ds = out / "datasets" / "fineweb10B_sp1024"
    with pytest.raises(ConnectionError):
        fw.download("sp1024", 3, out=out, fetch=HubFetch(hub, fail_on="fineweb_train_000001.bin"))
    assert (ds / "fineweb_train_000000.bin").is_file()
    assert not (ds / "fineweb_train_000001.bin").exists()
    assert not (ds / "fineweb_train_000002.bin").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]
    # a later run completes the job, fetching only what is missing
    fetch = HubFetch(hub)
    fw.download("sp1024", 3, out=out, fetch=fetch)
    assert [c.rsplit("/", 1)[1] for c in fetch.calls] == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"]
    assert fw.read_shard(ds / "fineweb_train_000001.bin").size == 600


def test_download_fetch_writing_bad_shard_is_rejected(tmp_path):
    hub = make_hub(tmp_path / "hub")
    out = tmp_path / "data"

    def bad_fetch(repo_path, local_path):
        data = (hub / repo_path).read_bytes()
        local_path.write_bytes(data[:-4] if repo_path.endswith(".bin") else data)

    with pytest.raises(ValueError, match="fineweb_val_000000.bin"):
        fw.download("sp1024", 1, out=out, fetch=bad_fetch)
    assert not list((out / "datasets").rglob("*.bin"))
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


def test_download_errors(tmp_path):
    hub = make_hub(tmp_path / "hub")
    with pytest.raises(ValueError, match="only 3 train shards"):
        fw.download("sp1024", 4, out=tmp_path / "data", fetch=HubFetch(hub))
    with pytest.raises(ValueError, match="unknown variant"):
        fw.download("sp4096", 1, out=tmp_path / "data", fetch=HubFetch(hub))
    with pytest.raises(ValueError, match="fineweb10B_sp8192 not listed"):
        fw.download("sp8192", 1, out=tmp_path / "data", fetch=HubFetch(hub))


def test_download_refetches_stale_manifest_for_other_variant(tmp_path):
    hub = make_hub(tmp_path / "hub", datasets=(("fineweb10B_sp1024", "fineweb_1024_bpe", 2),
                                               ("fineweb10B_sp8192", "fineweb_8192_bpe", 2)))
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"datasets": [], "tokenizers": []}))
    fw.download("sp8192", 1, out=out, fetch=HubFetch(hub))
    assert (out / "datasets" / "fineweb10B_sp8192" / "fineweb_train_000000.bin").is_file()
    assert (out / "tokenizers" / "fineweb_8192_bpe.model").is_file()
    assert not (out / "datasets" / "fineweb10B_sp1024").exists()


def test_download_cli_with_mirror(tmp_path):
    hub = make_hub(tmp_path / "hub")
    out = tmp_path / "data"
    cmd = [sys.executable, str(FINEWEB_PY), "download", "--variant", "sp1024", "--train-shards", "1",
           "--out", str(out), "--mirror", str(hub)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (out / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").is_file()
    cmd[cmd.index("--train-shards") + 1] = "9"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "only 3 train shards" in r.stderr and "Traceback" not in r.stderr


def test_default_download_requests_the_published_layout(tmp_path):
    """With no prefix given, the very first request is the export's datasets/manifest.json and every later
    request sits under datasets/ (the old default asked for a root the export does not have)."""
    hub = make_hub(tmp_path / "hub")
    fetch = HubFetch(hub)
    fw.download("sp1024", 1, out=tmp_path / "data", fetch=fetch)
    assert fetch.calls[0] == "datasets/manifest.json"
    assert "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin" in fetch.calls
    assert "datasets/tokenizers/fineweb_1024_bpe.model" in fetch.calls


def test_mirror_without_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, str(FINEWEB_PY), "download", "--train-shards", "1", "--out",
                        str(tmp_path / "data"), "--mirror", str(tmp_path / "empty")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "manifest.json: not found in mirror" in r.stderr and "datasets/tokenizers" in r.stderr


def test_unreachable_hub_is_a_clear_error(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # offline: nothing cached
    r = subprocess.run([sys.executable, str(FINEWEB_PY), "download", "--train-shards", "1", "--out",
                        str(tmp_path / "data")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "could not fetch datasets/manifest.json from the Hugging Face dataset willdepueoai/parameter-golf" \
        in r.stderr


def test_hf_fetch_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(ValueError, match="huggingface_hub is not installed"):
        fw.hf_fetch("willdepueoai/parameter-golf")("a/b.bin", tmp_path / "b.bin")


# ----------------------------------------------------------------------------- offline tokenizer

def test_pydoc_corpus_and_tokenizer(tmp_path):
    docs = fw.pydoc_docs(doc_chars=2000, modules=["json", "textwrap", "string", "bisect", "heapq", "copy"])
    assert len(docs) >= 5 and all(isinstance(d, str) and d for d in docs)
    path = tmp_path / "docs.jsonl"
    assert fw.write_docs_jsonl(path, docs) == len(docs)
    assert list(fw.iter_docs(path)) == docs
    model = fw.train_tokenizer(path, tmp_path / "tok", vocab_size=300)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert 256 < sp.get_piece_size() <= 300
    res = fw.build_shards(path, model, tmp_path / "out", val_docs=2)
    assert res["docs_val"] == 2 and res["bos_id"] == 1


# ----------------------------------------------------------------------------- check (format; the leak guard itself:
# tests/test_caseops.py)

def _check_dir(tmp_path, n_val=300, n_train=(400, 400)):
    d = tmp_path / "fineweb10B_sp1024"
    rng = np.random.default_rng(5)

    def stream(n):
        toks = rng.integers(2, 1024, size=n)
        toks[::50] = 1
        return toks

    fw.write_shard(d / "fineweb_val_000000.bin", stream(n_val))
    for i, n in enumerate(n_train):
        fw.write_shard(d / f"fineweb_train_{i:06d}.bin", stream(n))
    return d


def test_list_shards_keeps_sidecars_apart(tmp_path):
    d = _check_dir(tmp_path)
    fw.write_shard(d / "fineweb_val_bytes_000000.bin", np.zeros(300, dtype=np.int64))
    (d / "fineweb_train_notes.bin").write_bytes(b"x")
    got = {k: [p.name for p in v] for k, v in fw.list_shards(d).items()}
    assert got == {"train": ["fineweb_train_000000.bin", "fineweb_train_000001.bin"],
                   "val": ["fineweb_val_000000.bin"], "val_bytes": ["fineweb_val_bytes_000000.bin"]}


def test_check_clean_and_counts(tmp_path):
    d = _check_dir(tmp_path)
    r = fw.check_data(d)
    assert r["vocab_size"] == 1024  # the export's folder name
    assert (r["train_shards"], r["val_shards"], r["train_tokens"], r["val_tokens"]) == (2, 1, 800, 300)
    assert r["val_docs"] == 6 and r["val_docs_checked"] == 6 and r["leaked_docs"] == 0
    assert r["sidecar_bytes"] is None and r["train_docs"] == 16


@pytest.mark.parametrize("damage,message", [
    ("vocab", "token id 1500 >= vocab size 1024"),
    ("header", "bad magic"),
    ("size", "does not match header"),
    ("no_train", "no training shards"),
    ("sidecar_len", "299 byte counts for 300 tokens"),
    ("sidecar_bos", "1 BOS token(s) with a non-zero byte count"),
    ("sidecar_missing", "0 sidecar(s) for 1 val shard(s)"),
])
def test_check_rejects_bad_data(tmp_path, damage, message):
    d = _check_dir(tmp_path)
    train = d / "fineweb_train_000001.bin"
    require = False
    if damage == "vocab":
        toks = fw.read_shard(train).copy()
        toks[7] = 1500
        fw.write_shard(train, toks)
    elif damage == "header":
        raw = bytearray(train.read_bytes())
        raw[0:4] = np.int32(1).tobytes()
        train.write_bytes(bytes(raw))
    elif damage == "size":
        train.write_bytes(train.read_bytes()[:-2])
    elif damage == "no_train":
        for p in d.glob("fineweb_train_*.bin"):
            p.unlink()
    elif damage == "sidecar_len":
        fw.write_shard(d / "fineweb_val_bytes_000000.bin", np.zeros(299, dtype=np.int64))
    elif damage == "sidecar_bos":
        nb = np.zeros(300, dtype=np.int64)
        nb[50] = 4  # token 50 is a BOS
        fw.write_shard(d / "fineweb_val_bytes_000000.bin", nb)
    elif damage == "sidecar_missing":
        require = True
    with pytest.raises(ValueError, match=re.escape(message)):
        fw.check_data(d, require_sidecar=require)
    r = subprocess.run([sys.executable, str(FINEWEB_PY), "check", str(d)] + ["--require-sidecar"] * require,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_check_vocab_size_flag_and_missing_dir(tmp_path):
    d = _check_dir(tmp_path)
    r = subprocess.run([sys.executable, str(FINEWEB_PY), "check", str(d), "--vocab-size", "1000"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and ">= vocab size 1000 (from --vocab-size)" in r.stderr
    r = subprocess.run([sys.executable, str(FINEWEB_PY), "check", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "data folder not found" in r.stderr
