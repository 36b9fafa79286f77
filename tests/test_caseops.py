"""CaseOps data (lossless_caps_caseops_v1): the transform, the per-token byte sidecar, `build --caseops`,
`download --variant sp8192_caseops`, and the validation/train leak guard `check` (also in run.sh's preflight)."""

from __future__ import annotations

import inspect
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, REPO, SHARED

import fineweb as fw

FINEWEB_PY = REPO / "data" / "fineweb.py"
TOK_CASEOPS = SHARED / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
TOK_PLAIN = SHARED / "tokenizers" / "fineweb_8192_bpe.model"
DATASET = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
T, A, C, E = "\ue001", "\ue002", "\ue003", "\ue004"  # TITLE, ALLCAPS, CAPNEXT, ESC
BOM_DOCS = [2212, 2879, 2917, 3112]  # the shared corpus documents that start with U+FEFF


def need_caseops():
    if not (CORPUS.is_file() and TOK_CASEOPS.is_file()):
        pytest.skip(f"needs the shared corpus and CaseOps tokenizer ({CORPUS}, {TOK_CASEOPS}): absent here")


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(FINEWEB_PY), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sp():
    need_caseops()
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(TOK_CASEOPS))


@pytest.fixture(scope="module")
def corpus_docs():
    need_caseops()
    return list(fw.iter_docs(CORPUS))


# ----------------------------------------------------------------------------- the transform

ENCODED = [
    ("", ""),
    ("the cat sat", "the cat sat"),
    ("The NASA Launch", f"{T}the {A}nasa {T}launch"),
    ("I", f"{T}i"),
    ("A", f"{T}a"),
    ("I am A-OK", f"{T}i am {T}a-{A}ok"),
    ("McDonald", f"{T}mc{C}donald"),
    ("NASA's", f"{A}nasa's"),
    ("COVID19 iPhone12", f"{A}covid19 i{C}phone12"),
    ("aBC ABc", f"a{C}b{C}c {T}a{C}bc"),
    ("HTTPServer", f"{T}h{C}t{C}t{C}p{C}server"),
    ("Émile ÉCOLE straße ÀB", f"Émile É{A}cole straße À{T}b"),  # only ASCII letters are case-mapped
    ("x\ue001y", f"x{E}\ue001y"),  # literal operator characters are escaped
    (E, E + E),
    (E + T + "Ab", f"{E}{E}{E}{T}{T}ab"),
    ("\ue000Sentinel", f"\ue000{T}sentinel"),  # U+E000 is not a CaseOps operator
    ("line\nBREAK\tTab", f"line\n{A}break\t{T}tab"),
]


@pytest.mark.parametrize("text,encoded", ENCODED)
def test_encode_table_and_roundtrip(text, encoded):
    assert fw.caseops_encode(text) == encoded
    assert fw.caseops_decode(encoded) == text
    assert int(fw.caseops_char_bytes(encoded).sum()) == len(text.encode("utf-8"))


def test_roundtrip_random_strings():
    rng = random.Random(1234)
    alphabet = "aAbBmMzZ \n'-19" + T + A + C + E + "\ue000Éßé😀"
    changed = 0
    for _ in range(20000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        enc = fw.caseops_encode(s)
        assert fw.caseops_decode(enc) == s, repr(s)
        assert re.search("[A-Z]", enc) is None
        assert int(fw.caseops_char_bytes(enc).sum()) == len(s.encode("utf-8")), repr(s)
        changed += enc != s
    assert changed > 15000  # the alphabet makes most strings need an operator


@pytest.mark.parametrize("bad", [E, T + " x", A, C + "1", "ab" + T, "x" + A + "-"])
def test_decode_rejects_dangling_operators(bad):
    with pytest.raises(ValueError, match="malformed CaseOps text"):
        fw.caseops_decode(bad)


def test_roundtrip_every_shared_corpus_document(corpus_docs):
    assert len(corpus_docs) == 3176
    ops = np.zeros(4, dtype=np.int64)
    for doc in corpus_docs:
        enc = fw.caseops_encode(doc)
        assert fw.caseops_decode(enc) == doc
        ops += [enc.count(ch) for ch in (T, A, C, E)]
    assert re.search("[A-Z]", "".join(fw.caseops_encode(d) for d in corpus_docs[:200])) is None
    assert ops.tolist() == [499163, 253295, 82768, 0]  # TITLE, ALLCAPS, CAPNEXT, ESC over the corpus


# ----------------------------------------------------------------------------- tokens and byte counts

def test_operator_ids_and_token_bytes(sp):
    assert [sp.piece_to_id(ch) for ch in (T, A, C, E)] == [4, 5, 6, 7]
    (ids, nbytes), = fw.caseops_tokenize(sp, ["The NASA Launch"])
    assert [sp.id_to_piece(int(i)) for i in ids] == [T, "the", "▁", A, "nas", "a", "▁", T, "la", "unch"]
    assert nbytes.tolist() == [0, 3, 1, 0, 3, 1, 1, 0, 2, 4]
    # an escaped literal operator is 3 bytes of text even though it is token 4, like the TITLE operator
    (ids, nbytes), = fw.caseops_tokenize(sp, [T + "x"])
    assert ids.tolist()[:2] == [7, 4] and nbytes.tolist() == [0, 3, 1]
    assert ids.tolist() == sp.encode(fw.caseops_encode(T + "x"))


def _dropped_at_edges(doc: str) -> int:
    """Bytes SentencePiece's normalizer drops at a document's edges (they belong to no token)."""
    return len(doc.encode()) - len(doc.lstrip(" \t\n\ufeff").rstrip(" \t\n").encode())


def test_byte_counts_sum_to_original_bytes(sp, corpus_docs):
    docs = corpus_docs[:60] + [corpus_docs[i] for i in BOM_DOCS] + [
        "  Leading and trailing  \n", "", "😀 Ünïcode ÀB " + T + " NASA", "x\u00adY ﬁne Ⅷ"]
    assert all(corpus_docs[i].startswith("\ufeff") for i in BOM_DOCS)
    default = fw.caseops_tokenize(sp, docs, num_threads=2)
    exact = fw.caseops_tokenize(sp, docs, exact=True, num_threads=2)
    dropped = [_dropped_at_edges(d) for d in docs]
    assert sum(dropped) == 4 * 3 + 5  # four BOMs, then two leading spaces and "  \n" trailing
    for doc, (ids, nb), (ids2, nb2), drop in zip(docs, default, exact, dropped):
        size = len(doc.encode("utf-8"))
        assert ids.tolist() == sp.encode(fw.caseops_encode(doc))
        assert np.array_equal(ids, ids2)
        assert int(nb.sum()) == size - drop, repr(doc[:40])
        assert int(nb2.sum()) == size
        assert (nb >= 0).all() and (nb2 >= 0).all()
        if E not in fw.caseops_encode(doc):
            assert not nb[(ids >= 4) & (ids <= 7)].any()  # operator tokens stand for no bytes


def test_serialized_proto_path_agrees(sp, corpus_docs):
    """Older sentencepiece (no offset_mapping): the spans come from a parsed serialized proto instead."""

    class NoOffsets:
        def encode(self, *args, **kwargs):
            if kwargs.get("out_type") == "offset_mapping":
                raise ValueError("unknown return_type")
            return sp.encode(*args, **kwargs)

        def encode_as_serialized_proto(self, text):
            return sp.encode(text, out_type="serialized_proto")

    docs = corpus_docs[:8] + [corpus_docs[BOM_DOCS[0]], " 😀A" + E + " x ", ""]
    for (ids, nb), (ids2, nb2) in zip(fw.caseops_tokenize(sp, docs), fw.caseops_tokenize(NoOffsets(), docs)):
        assert np.array_equal(ids, ids2) and np.array_equal(nb, nb2)


# ----------------------------------------------------------------------------- build --caseops

N_DOCS, N_VAL, SHARD_TOKENS = 120, 40, 40_000


@pytest.fixture(scope="module")
def built(tmp_path_factory, sp):
    out = tmp_path_factory.mktemp("caseops") / "good"
    res = fw.build_shards(CORPUS, TOK_CASEOPS, out, val_docs=N_VAL, max_docs=N_DOCS, shard_tokens=SHARD_TOKENS,
                          caseops=True)
    return out, res


def test_build_caseops_tokens_and_sidecar(built, sp, corpus_docs):
    out, res = built
    docs = corpus_docs[:N_DOCS]
    assert res["docs_val"] == N_VAL and res["docs_train"] == N_DOCS - N_VAL
    assert len(res["files_val"]) >= 2  # several val shards, each with its sidecar
    assert [p.name for p in res["files_val_bytes"]] == [f"fineweb_val_bytes_{i:06d}.bin"
                                                         for i in range(len(res["files_val"]))]
    assert fw.list_shards(out)["val"] == res["files_val"]  # the sidecars are not val shards
    for split, chunk in (("val", docs[:N_VAL]), ("train", docs[N_VAL:])):
        got = np.concatenate([fw.read_shard(p) for p in res[f"files_{split}"]])
        want = np.concatenate([[1] + sp.encode(fw.caseops_encode(d)) for d in chunk]).astype(np.uint16)
        assert np.array_equal(got, want)
    toks = np.concatenate([fw.read_shard(p) for p in res["files_val"]])
    nbytes = np.concatenate([fw.read_shard(p) for p in res["files_val_bytes"]]).astype(np.int64)
    for p, q in zip(res["files_val"], res["files_val_bytes"]):
        assert fw.read_shard_header(p) == fw.read_shard_header(q)
    assert nbytes.size == toks.size
    bos = np.flatnonzero(toks == 1)
    assert bos.size == N_VAL and not nbytes[bos].any()
    per_doc = np.add.reduceat(nbytes, bos)
    assert all(d == d.strip() for d in docs[:N_VAL])  # nothing for the normalizer to drop at the edges
    assert per_doc.tolist() == [len(d.encode("utf-8")) for d in docs[:N_VAL]]
    assert res["bytes_val"] == int(nbytes.sum()) == sum(len(d.encode()) for d in docs[:N_VAL])


def test_build_caseops_cli_exact_bytes(tmp_path, sp):
    docs = ["\ufeffThe BOM doc.", "  Spaces AROUND  ", "McDonald's NASA iPhone", "plain text", "Train ONLY"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    sums = {}
    for flag in ([], ["--exact-bytes"]):
        out = tmp_path / ("exact" if flag else "default")
        r = cli("build", "--caseops", "--docs", path, "--tokenizer", TOK_CASEOPS, "--out", out, "--val-docs", 4, *flag)
        assert r.returncode == 0, r.stderr
        assert "CaseOps byte sidecar" in r.stdout
        sums[bool(flag)] = int(fw.read_shard(out / "fineweb_val_bytes_000000.bin").astype(np.int64).sum())
    assert sums[True] == sum(len(d.encode()) for d in docs[:4])
    assert sums[False] == sums[True] - 3 - 4  # the BOM, two leading and two trailing spaces
    r = cli("build", "--docs", path, "--tokenizer", TOK_CASEOPS, "--out", tmp_path / "x", "--exact-bytes")
    assert r.returncode != 0 and "--exact-bytes only applies with --caseops" in r.stderr


def test_build_val_docs_defaults_to_the_scored_50000(tmp_path):
    args = fw._parser().parse_args(["build", "--caseops", "--docs", "d", "--tokenizer", "t", "--out", "o"])
    assert args.val_docs == 50_000 == fw.CHALLENGE_VAL_DOCS
    assert inspect.signature(fw.build_shards).parameters["val_docs"].default == 50_000
    need_caseops()
    # 60 docs and no --val-docs: all 60 are validation, none left to train on (never a silent 10,000)
    r = cli("build", "--caseops", "--docs", CORPUS, "--tokenizer", TOK_CASEOPS, "--out", tmp_path / "o",
            "--max-docs", 60)
    assert r.returncode != 0 and "only 60 docs but --val-docs is 50000" in r.stderr, r.stderr
    # fewer validation docs than the challenge scores: built, with a warning naming the leak it invites
    r = cli("build", "--caseops", "--docs", CORPUS, "--tokenizer", TOK_CASEOPS, "--out", tmp_path / "o",
            "--max-docs", 12, "--val-docs", 10)
    assert r.returncode == 0, r.stderr
    assert "warning: --val-docs 10 is below the 50000 documents the challenge scores" in r.stdout
    assert "#2127" in r.stdout


# ----------------------------------------------------------------------------- the leak guard

def test_check_passes_clean_caseops_build(built):
    out, res = built
    r = fw.check_data(out, vocab_size=8192, require_sidecar=True, workers=2)
    assert r["leaked_docs"] == 0 and r["leaked_by_shard"] == {}
    assert r["val_docs"] == r["val_docs_checked"] == N_VAL
    assert r["train_shards"] == len(res["files_train"]) and r["val_shards"] == len(res["files_val"])
    assert r["val_tokens"] == res["tokens_val"] and r["train_tokens"] == res["tokens_train"]
    assert r["sidecar_bytes"] == res["bytes_val"]
    p = cli("check", out, "--vocab-size", 8192, "--require-sidecar")
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("check: "))
    fields = dict(f.split(":", 1) for f in line.split()[1:])
    assert fields["train_shards"] == str(len(res["files_train"])) and fields["val_docs"] == str(N_VAL)
    assert fields["leaked_docs"] == "0" and fields["val_bytes"] == str(res["bytes_val"])


def test_check_catches_the_issue_2127_leak(built, tmp_path):
    """The incident: train shards prepared with 10 validation docs, scored against a 40-doc validation
    split, so docs 10..39 are trained on.  Small shards cut most of those docs across shard boundaries."""
    out, res = built
    bad = fw.build_shards(CORPUS, TOK_CASEOPS, tmp_path / "bad", val_docs=10, max_docs=N_DOCS,
                          shard_tokens=SHARD_TOKENS, caseops=True)
    mixed = tmp_path / DATASET
    mixed.mkdir()
    for p in res["files_val"] + res["files_val_bytes"] + bad["files_train"]:
        shutil.copy(p, mixed / p.name)
    r = fw.check_data(mixed, require_sidecar=True)
    assert r["vocab_size"] == 8192  # inferred from the export's folder name
    assert r["leaked_docs"] == N_VAL - 10
    assert sum(r["leaked_by_shard"].values()) == N_VAL - 10  # each leaked doc starts in one shard
    assert set(r["leaked_by_shard"]) <= {p.name for p in bad["files_train"]}
    assert r["leaked_examples"][0][0] == 10  # the first leaked document is validation doc #10
    p = cli("check", mixed)
    assert p.returncode != 0
    assert f"{N_VAL - 10} of {N_VAL} validation documents also occur in training shards" in p.stderr
    assert "fineweb_train_000000.bin (" in p.stderr and "Traceback" not in p.stderr
    assert "leak: fineweb_train_000000.bin holds" in p.stdout
    assert "leaked_docs:30" in p.stdout
    assert cli("check", mixed, "--max-leaked", 30).returncode == 0


# ----------------------------------------------------------------------------- the two bpb denominators

RATIO_LINE = re.compile(r"caseops val bytes: sidecar (\d+), plain sp8192 table (\d+), ratio M/N = ([0-9.]+) "
                        r"\(compare bpb only over one denominator; README \"CaseOps\"\)")


def need_plain():
    need_caseops()
    if not TOK_PLAIN.is_file():
        pytest.skip(f"needs the plain sp8192 tokenizer {TOK_PLAIN}: absent here")


def official_plain_bytes(sp, docs) -> int:
    """Written out piece by piece, apart from fineweb.py: the bytes the official scorer counts for ``docs``
    tokenized with the plain tokenizer, each after a BOS (a '▁' piece adds 1 unless after a boundary)."""
    def boundary(t):
        return sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t)

    total = 0
    for doc in docs:
        prev = sp.bos_id()
        for i in sp.encode(doc):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                total += 1
            elif not boundary(i):
                space = piece.startswith("\u2581")
                total += len(piece[space:].encode()) + (space and not boundary(prev))
            prev = i
    return total


def test_plain_byte_tables_are_the_scorers(sp):
    need_plain()
    import train_gpt_human as tg

    plain = fw.load_tokenizer(TOK_PLAIN)
    tables = tg.build_byte_tables(plain, plain.get_piece_size())
    assert all(np.array_equal(t.numpy(), mine) for t, mine in zip(tables[:3], fw.plain_byte_tables(plain)))
    # "\n\n" is 2 original bytes in the sidecar but folds to one '▁' (1 byte) for the plain tokenizer
    assert plain.encode("a\n\nb", out_type=str) == ["a", "\u2581b"]
    assert fw.plain_table_bytes(plain, ["a\n\nb", " x"]) == 3 + 1  # "x": first piece after BOS, no space
    (ids, nbytes), = fw.caseops_tokenize(sp, ["a\n\nb"])
    assert int(nbytes.sum()) == 4


def test_build_and_check_print_the_plain_table_ratio(tmp_path):
    need_plain()
    out = tmp_path / "ds"
    r = cli("build", "--caseops", "--docs", CORPUS, "--tokenizer", TOK_CASEOPS, "--out", out,
            "--max-docs", 24, "--val-docs", 20)
    assert r.returncode == 0, r.stderr
    m = RATIO_LINE.search(r.stdout)
    assert m, r.stdout
    sidecar, plain, printed = int(m[1]), int(m[2]), float(m[3])
    docs = list(fw.iter_docs(CORPUS, 20))
    want_plain = official_plain_bytes(fw.load_tokenizer(TOK_PLAIN), docs)
    want_sidecar = sum(len(d.encode()) - _dropped_at_edges(d) for d in docs)
    assert (sidecar, plain) == (want_sidecar, want_plain)
    assert sidecar == sum(int(fw.read_shard(p).sum(dtype=np.int64)) for p in out.glob("fineweb_val_bytes_*"))
    assert abs(plain / sidecar - want_plain / want_sidecar) < 1e-9 and abs(printed - plain / sidecar) < 5e-7
    assert 0.85 < printed < 1
    # check --plain-ratio reads the same documents back from the shards (decoded) and prints the same line
    k = cli("check", out, "--plain-ratio", TOK_PLAIN)
    assert k.returncode == 0, k.stderr
    assert RATIO_LINE.search(k.stdout)[0] == m[0]
    assert "caseops val bytes" not in cli("check", out).stdout  # opt-in
    # no plain tokenizer beside the CaseOps one: one line, no ratio, the build still succeeds
    lone = tmp_path / "tok"
    lone.mkdir()
    shutil.copy(TOK_CASEOPS, lone / TOK_CASEOPS.name)
    r = cli("build", "--caseops", "--docs", CORPUS, "--tokenizer", lone / TOK_CASEOPS.name, "--out", out,
            "--max-docs", 3, "--val-docs", 2)
    assert r.returncode == 0, r.stderr
    assert f"plain tokenizer {lone / fw.PLAIN_TOKENIZER} not found" in r.stdout
    assert not RATIO_LINE.search(r.stdout)
    k = cli("check", out, "--plain-ratio", TOK_PLAIN, "--caseops-tokenizer", lone / "missing.model")
    assert k.returncode != 0 and "CaseOps tokenizer not found" in k.stderr


def _stream(docs):
    return np.concatenate([np.concatenate([[1], d]) for d in docs]).astype(np.uint16)


def _synthetic(rng, n, lo=40, hi=400):
    return [rng.integers(8, 8192, size=int(rng.integers(lo, hi))) for _ in range(n)]


def test_check_exact_document_match_across_shards(tmp_path):
    rng = np.random.default_rng(7)
    val = _synthetic(rng, 50)
    val[3] = val[3][:10]  # a short validation doc: below --min-doc-tokens 16 unless lowered
    train = _synthetic(rng, 200)
    near = np.concatenate([val[5][:60], rng.integers(8, 8192, size=50)])  # same first 60 tokens, other tail
    stream = _stream(train[:50] + [val[7], near, val[3]] + train[50:100] + [val[9]] + train[100:])
    cut = int(np.flatnonzero(stream == 1)[100 + 3]) + 1 + 5  # 5 tokens of val[9] end shard 0, the rest start shard 1
    d = tmp_path / "ds"
    fw.write_shard(d / "fineweb_val_000000.bin", _stream(val))
    fw.write_shard(d / "fineweb_train_000000.bin", stream[:cut])
    fw.write_shard(d / "fineweb_train_000001.bin", stream[cut:])
    # a copy of val[11] ends the last shard present, cut after 40 tokens: counted as a leak (equal start)
    fw.write_shard(d / "fineweb_train_000002.bin", _stream(train[:3] + [val[11][:40]]))
    for workers in (1, 3):
        r = fw.check_data(d, workers=workers)
        assert r["leaked_docs"] == 3, r
        assert r["leaked_by_shard"] == {"fineweb_train_000000.bin": 2, "fineweb_train_000002.bin": 1}
        assert r["val_docs"] == 50 and r["val_docs_checked"] == 49 and r["vocab_size"] is None
        assert sorted(vi for vi, _, _ in r["leaked_examples"]) == [7, 9, 11]
    r = fw.check_data(d, min_doc_tokens=1)
    assert r["leaked_docs"] == 4 and r["val_docs_checked"] == 50
    assert fw.check_data(d, prefix_tokens=4)["leaked_docs"] == 3  # collisions on a short prefix get confirmed away


def test_check_on_a_large_synthetic_shard(tmp_path):
    """A 5M-token train shard against 5M validation tokens of random documents: no false leak, and the run reports
    its time (README gives the measured speed; speed targets live in benchmarks, not in timed tests)."""
    rng = np.random.default_rng(0)
    toks = rng.integers(2, 8192, size=10_000_000).astype(np.uint16)
    toks[np.unique(rng.integers(0, toks.size, size=10_000))] = 1
    toks[0] = 1
    fw.write_shard(tmp_path / "fineweb_val_000000.bin", toks[:5_000_000])
    fw.write_shard(tmp_path / "fineweb_train_000000.bin", toks[5_000_000:])
    r = fw.check_data(tmp_path, vocab_size=8192, workers=1)
    assert r["leaked_docs"] == 0 and r["train_tokens"] == 5_000_000 and r["val_docs"] > 4000
    assert r["seconds"] > 0


# ----------------------------------------------------------------------------- download

def make_caseops_hub(root: Path, n_train=3, sidecar=True, glob_in_manifest=True, vocab_file=True) -> Path:
    """A folder laid out exactly like the published CaseOps export (romeerp/parameter-golf-caseops-v1)."""
    base = root / "datasets"
    ds = base / "datasets" / DATASET
    rng = np.random.default_rng(3)
    val = _stream(_synthetic(rng, 30))
    fw.write_shard(ds / "fineweb_val_000000.bin", val)
    if sidecar:
        fw.write_shard(ds / "fineweb_val_bytes_000000.bin", np.where(val == 1, 0, rng.integers(1, 9, val.size)))
    for i in range(n_train):
        fw.write_shard(ds / f"fineweb_train_{i:06d}.bin", _stream(_synthetic(rng, 40)))
    tok = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"
    (base / "tokenizers").mkdir(parents=True)
    if TOK_CASEOPS.is_file():
        shutil.copy(TOK_CASEOPS, base / "tokenizers" / f"{tok}.model")
    else:
        (base / "tokenizers" / f"{tok}.model").write_bytes(b"model")
    if vocab_file:
        (base / "tokenizers" / f"{tok}.vocab").write_text("vocab\n")
    entry = {"name": DATASET, "tokenizer_name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved",
             "tokenizer_kind": "sentencepiece_bpe", "path": f"datasets/{DATASET}",
             "train_glob": f"datasets/{DATASET}/fineweb_train_*.bin",
             "val_glob": f"datasets/{DATASET}/fineweb_val_*.bin", "vocab_size": 8192, "bos_id": 1, "eos_id": 2,
             "stats": {"docs_val": 30, "files_val": 1, "files_train": n_train}}
    if glob_in_manifest:
        entry["val_bytes_glob"] = f"datasets/{DATASET}/fineweb_val_bytes_*.bin"
    manifest = {"version": "10B", "num_val_docs": 30, "datasets": [entry],
                "tokenizers": [{"name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved", "kind": "sentencepiece_bpe",
                                "vocab_size": 8192, "text_transform": "lossless_caps_caseops_v1",
                                "model_path": f"tokenizers/{tok}.model", "vocab_path": f"tokenizers/{tok}.vocab"}]}
    (base / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_download_caseops_from_mirror(tmp_path):
    hub = make_caseops_hub(tmp_path / "hub")
    out = tmp_path / "data"
    r = cli("download", "--variant", "sp8192_caseops", "--train-shards", 2, "--out", out, "--mirror", hub)
    assert r.returncode == 0, r.stderr
    ds = out / "datasets" / DATASET
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                   "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    for p in ds.iterdir():
        assert p.read_bytes() == (hub / "datasets" / "datasets" / DATASET / p.name).read_bytes()
    tok = out / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    assert tok.read_bytes() == (hub / "datasets" / "tokenizers" / tok.name).read_bytes()
    assert "done: 6 fetched" in r.stdout  # 4 shard files + the tokenizer's .model and .vocab
    k = cli("check", ds, "--require-sidecar")
    assert k.returncode == 0, k.stderr
    assert "vocab:8192" in k.stdout and "val_docs:30" in k.stdout and "leaked_docs:0" in k.stdout


def test_download_caseops_sidecar_without_manifest_glob_and_missing(tmp_path):
    hub = make_caseops_hub(tmp_path / "hub", glob_in_manifest=False, vocab_file=False)
    res = fw.download("sp8192_caseops", 1, out=tmp_path / "a", fetch=fw.mirror_fetch(hub))
    names = sorted(p.name for p in res["fetched"])
    assert names == ["fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", "fineweb_train_000000.bin",
                     "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]  # no .vocab on the hub: optional
    nohub = make_caseops_hub(tmp_path / "nohub", sidecar=False)
    r = cli("download", "--variant", "sp8192_caseops", "--train-shards", 1, "--out", tmp_path / "b", "--mirror", nohub)
    assert r.returncode != 0 and "fineweb_val_bytes_000000.bin: not found in mirror" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- run.sh preflight

def test_run_sh_caseops_variant_and_leak_guard(tmp_path):
    from test_run_sh import FAKE_PYTHON, H100, _exe, fake_nvidia_smi, run

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    shutil.copy(REPO / "run.sh", repo / "run.sh")
    shutil.copy(FINEWEB_PY, repo / "data" / "fineweb.py")
    (repo / "train_gpt_human.py").write_text("raise SystemExit('not meant to run')\n")
    bindir = tmp_path / "bin"
    fake_nvidia_smi(bindir, H100)
    python = _exe(bindir / "fakepython", FAKE_PYTHON % sys.executable)
    hub = make_caseops_hub(tmp_path / "hub")
    env = dict(PYTHON=str(python), FINEWEB_MIRROR=str(hub), TRAIN_SHARDS="2", MIN_FREE_MB="1",
               VARIANT="sp8192_caseops")

    r = run(repo / "run.sh", bindir, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "downloading sp8192_caseops" in r.stdout and "leaked_docs:0" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("FAKE_TORCHRUN"))
    assert f"DATA_PATH=./data/datasets/{DATASET}" in line and "VOCAB_SIZE=8192" in line
    assert "TOKENIZER_PATH=./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model" in line
    assert (repo / "data" / "datasets" / DATASET / "fineweb_val_bytes_000000.bin").is_file()
    # PRESET=record takes the CaseOps data when it is here, without being told (and the plain sp8192 data otherwise)
    r = run(repo / "run.sh", bindir, **dict(env, VARIANT="", PRESET="record"))
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("FAKE_TORCHRUN"))
    assert r.returncode == 0 and f"DATA_PATH=./data/datasets/{DATASET}" in line, r.stdout + r.stderr

    # a train shard holding validation documents: the run stops before training
    ds = repo / "data" / "datasets" / DATASET
    val = fw.read_shard(ds / "fineweb_val_000000.bin")
    fw.write_shard(ds / "fineweb_train_000001.bin", val)
    r = run(repo / "run.sh", bindir, **env)
    assert r.returncode != 0 and "FAKE_TORCHRUN" not in r.stdout
    assert "preflight failed: data check of" in r.stderr and "30 of 30 validation documents" in r.stderr, r.stderr
    r = run(repo / "run.sh", bindir, DATA_CHECK="0", **env)
    assert r.returncode == 0 and "FAKE_TORCHRUN" in r.stdout and "DATA_CHECK=0" in r.stderr

    # a missing sidecar is fetched again; with a custom DATA_PATH it is an error
    (ds / "fineweb_val_bytes_000000.bin").unlink()
    fw.write_shard(ds / "fineweb_train_000001.bin", fw.read_shard(hub / "datasets" / "datasets" / DATASET /
                                                                  "fineweb_train_000001.bin"))
    r = run(repo / "run.sh", bindir, PREFLIGHT_ONLY="1", **env)
    assert r.returncode == 0 and (ds / "fineweb_val_bytes_000000.bin").is_file(), r.stdout + r.stderr
    custom = tmp_path / "custom"
    custom.mkdir()
    for name in ("fineweb_val_000000.bin", "fineweb_train_000000.bin"):
        shutil.copy(ds / name, custom / name)
    r = run(repo / "run.sh", bindir, PREFLIGHT_ONLY="1", DATA_PATH=str(custom), **env)
    assert r.returncode != 0 and "needs the byte sidecar" in r.stderr, r.stderr
