"""Shared fixtures: tiny shards built from ../shared with the real tokenizer, and a tiny CPU config."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZER_1024 = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
TOKENIZER_8192 = SHARED / "tokenizers" / "fineweb_8192_bpe.model"
CORPUS = SHARED / "corpus" / "docs_en.jsonl.xz"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))

TINY_ENV = {
    "DEVICE": "cpu", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "2048", "GRAD_ACCUM_STEPS": "1",
    "ITERATIONS": "40", "WARMUP_STEPS": "0", "WARMDOWN_ITERS": "10", "TRAIN_LOG_EVERY": "10",
    "EVAL_STRIDE": "64", "EVAL_BATCH_SEQS": "16", "MAX_WALLCLOCK_SECONDS": "0", "ENGRAM_BUCKETS": "256", "VE_DIM": "16",
    "EMA_DECAY": "0.9", "GPTQ_CALIB_BATCHES": "4", "VAL_MAX_TOKENS": "8193", "TTT_CHUNK_TOKENS": "2048",
    "TARGET_BYTES": "2000000", "COMPILE": "0",
}


def require_shared():
    if not (TOKENIZER_1024.exists() and CORPUS.exists()):
        pytest.skip(f"needs the shared corpus and tokenizers at {SHARED} (absent here)")


@pytest.fixture
def one_thread():
    """In-process torch work on one thread: steadier on a shared 2-core machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def count_scores(monkeypatch, P):
    """Wraps train_gpt_human.add_scores (through `monkeypatch`) so that, from then on, every prediction it
    scores is counted: for row r of a call add_scores(totals, nll, x, y, mask, windows, tables), the
    predictions windows[r][0] + c of every column c where mask[r, c] is set (rows past the windows must be
    masked out).  Returns the counts (P,), filled in as scoring runs."""
    import torch

    import train_gpt_human as tg

    counts, original = torch.zeros(P, dtype=torch.int64), tg.add_scores

    def counting(totals, nll, x, y, mask, windows, tables):
        m = mask.cpu()
        assert not m[len(windows):].any(), "a padding row is scored"
        for r, window in enumerate(windows):
            cols = m[r].nonzero().flatten()
            counts.index_add_(0, window[0] + cols, torch.ones_like(cols))
        return original(totals, nll, x, y, mask, windows, tables)

    monkeypatch.setattr(tg, "add_scores", counting)
    return counts


@pytest.fixture
def scored_counts(monkeypatch):
    """start(P): count_scores for the rest of the test; returns the counts tensor."""
    return lambda P: count_scores(monkeypatch, P)


def tiny_shards(tmp_path_factory, tokenizer):
    """Shards from the first 300 documents of the shared corpus (40 validation docs)."""
    require_shared()
    import fineweb

    out = tmp_path_factory.mktemp(f"tiny_data_{tokenizer.stem}")
    fineweb.build_shards(CORPUS, tokenizer, out, val_docs=40, max_docs=300)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return tiny_shards(tmp_path_factory, TOKENIZER_1024)


@pytest.fixture(scope="session")
def tiny_data_8192(tmp_path_factory):
    """The same documents as tiny_data, tokenized with the sp8192 tokenizer (the record preset's)."""
    return tiny_shards(tmp_path_factory, TOKENIZER_8192)


@pytest.fixture
def tiny_env(tiny_data, tmp_path):
    """Environment for a tiny CPU run; logs land under tmp_path."""
    env = {k: v for k, v in os.environ.items() if k not in TINY_ENV}
    env.update(TINY_ENV, DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(TOKENIZER_1024), RUN_ID="tiny",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def run_script(script, env, cwd, nproc=1, timeout=600):
    """Runs a training script as one process or under torchrun; returns (returncode, stdout+stderr)."""
    cmd = [sys.executable, str(script)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def final_metric(output, name):
    """(val_loss, val_bpb) from a `name val_loss:X val_bpb:Y` line."""
    for line in output.splitlines():
        if line.startswith(name + " "):
            fields = dict(f.split(":", 1) for f in line.split()[1:] if ":" in f)
            return float(fields["val_loss"]), float(fields["val_bpb"])
    raise AssertionError(f"no {name} line in output:\n{output[-3000:]}")
