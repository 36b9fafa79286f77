"""The trainer on CaseOps data: bytes come from the validation byte sidecar in every eval and TTT mode (the same
counting path as the tokenizer tables), and a missing or mismatched sidecar stops the run naming the file."""
import math
import time

import numpy as np
import pytest
import torch

import fineweb
import train_gpt_human as tg
from conftest import CORPUS, SHARED, TINY_ENV, require_shared

pytestmark = pytest.mark.usefixtures("one_thread")
CASEOPS = SHARED / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    require_shared()
    out = tmp_path_factory.mktemp("caseops")
    fineweb.build_shards(CORPUS, CASEOPS, out, val_docs=6, max_docs=20, caseops=True, exact_bytes=True)
    return out


def setup(data, **overrides):
    hp = tg.Hyperparameters.from_env(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(CASEOPS),
                                          VOCAB_SIZE="8192", VAL_MAX_TOKENS="0", ENGRAM_BUCKETS="0", VE_DIM="0",
                                          **overrides))
    val = tg.load_val_tokens(hp)
    sidecar = tg.load_val_bytes(hp, len(val))
    tables = tg.build_byte_tables(tg.load_tokenizer(hp), 8192)._replace(sidecar=sidecar)
    torch.manual_seed(0)
    return hp, val, sidecar, tables, tg.GPT(hp)


def test_sidecar_bytes_are_the_original_texts_bytes(caseops_data):
    hp, val, sidecar, tables, _ = setup(caseops_data)
    texts = list(fineweb.iter_docs(CORPUS, max_docs=6))
    assert len(sidecar) == len(val) and int((val == tg.BOS_ID).sum()) == 6
    assert int(sidecar.sum()) == sum(len(t.encode("utf-8")) for t in texts)  # every byte of the 6 documents, once
    assert int(sidecar[val == tg.BOS_ID].abs().sum()) == 0 and int(sidecar[(val >= 4) & (val <= 7)].sum()) == 0
    table = int(tg.token_bytes(tables, val[:-1], val[1:]).sum())  # the tables count each operator's 3 bytes
    assert table > int(sidecar[1:].sum())


@pytest.mark.parametrize("mode", ["sliding", "chunk", "phased"])
def test_every_eval_mode_counts_the_sidecar(caseops_data, tmp_path, mode, monkeypatch, scored_counts):
    monkeypatch.setattr(tg, "TTT_PREFIX_DOCS", 2)
    hp, val, sidecar, tables, model = setup(caseops_data, TTT_MODE="phased" if mode == "phased" else "chunk",
                                          TTT_DOC_BATCH="2", TTT_PHASES="1")
    val = val[:4097]
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    counts = scored_counts(len(val) - 1)
    if mode == "sliding":
        loss, bpb = tg.eval_sliding(model, val, hp, rt, tables)
    else:
        loss, bpb, *_ = tg.eval_ttt(model, val, hp, rt, tables, time.perf_counter())
    assert torch.equal(counts, torch.ones_like(counts))
    predictions, nbytes = len(val) - 1, int(sidecar[1:len(val)].sum())
    assert bpb == pytest.approx(loss * predictions / math.log(2) / nbytes, rel=1e-9)
    if mode == "sliding":  # the same scores counted with the tokenizer tables: the same loss, other bytes
        plain_loss, plain_bpb = tg.eval_sliding(model, val, hp, rt, tables._replace(sidecar=None))
        assert plain_loss == loss and plain_bpb < 0.99 * bpb


def test_a_mismatched_or_missing_sidecar_is_an_error_naming_the_file(caseops_data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in caseops_data.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sidecar = bad / "fineweb_val_bytes_000000.bin"
    fineweb.write_shard(sidecar, np.ones(100, dtype=np.uint16))
    hp = tg.Hyperparameters.from_env(dict(TINY_ENV, DATA_PATH=str(bad), VOCAB_SIZE="8192"))
    with pytest.raises(tg.ConfigError, match=r"fineweb_val_bytes_000000\.bin: 100 byte counts for the \d+ tokens"):
        tg.load_val_bytes(hp, 10)
    (bad / "fineweb_val_000001.bin").write_bytes((bad / "fineweb_val_000000.bin").read_bytes())
    with pytest.raises(tg.ConfigError, match="1 byte sidecars for 2 validation shards"):
        tg.load_val_bytes(hp, 10)
    sidecar.unlink()
    (bad / "fineweb_val_000001.bin").unlink()
    assert tg.load_val_bytes(hp, 10) is None  # plain data: the tokenizer tables count
    assert len(tg.shard_files(str(caseops_data), "val")) == 1  # the sidecar is never read as a shard
