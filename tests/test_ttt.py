"""Behaviour of score-first TTT (eval_ttt) on a tiny CPU model trained 30 steps on the shared corpus:
it helps where it should, it is a no-op when it should be, its knobs (entropy-adaptive epochs, eval budget)
do what they say, and two gloo ranks give the one-rank answer.

A closing benchmark (test_benchmark_report, run with -s to see it) prints bpb and wall time for no TTT /
Muon / Muon + entropy-adaptive epochs; it asserts only that Muon TTT beats no TTT.
"""
import copy
import time

import pytest
import torch

import train_gpt_human as tg
from conftest import TINY_ENV, TOKENIZER_1024
from test_ttt_legality import run_ranks

C = 512  # TTT_CHUNK_TOKENS unless a test says otherwise (a multiple of EVAL_STRIDE, see test_no_adaptation_...)
BATCH_SEQS = 4  # tg.TTT_BATCH_SEQS for these tests


@pytest.fixture(autouse=True)
def ttt_batch_seqs(monkeypatch):
    monkeypatch.setattr(tg, "TTT_BATCH_SEQS", BATCH_SEQS)


pytestmark = pytest.mark.usefixtures("one_thread")


def env_for(data_path, **overrides):
    env = dict(TINY_ENV, DATA_PATH=str(data_path), TOKENIZER_PATH=str(TOKENIZER_1024), ITERATIONS="30",
               TTT_CHUNK_TOKENS=str(C), EVAL_SEQ_LEN="128", EVAL_STRIDE="64", EVAL_BUDGET_SECONDS="100000")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class Trained:
    """A tiny model trained once per module; `model()` hands out fresh copies."""

    def __init__(self, data_path, log_dir):
        self.data_path = data_path
        self.env = env_for(data_path)
        self.hp = tg.Hyperparameters.from_env(self.env)
        self.rt = tg.Runtime(0, 1, torch.device("cpu"), str(log_dir / "log.txt"))
        self.tables = tg.build_byte_tables(tg.load_tokenizer(self.hp), self.hp.vocab_size)
        self.val = tg.load_val_tokens(self.hp)  # 8193 tokens (VAL_MAX_TOKENS)
        torch.manual_seed(0)
        model = tg.GPT(self.hp)
        tg.LateQAT.enabled = False
        t0 = time.perf_counter()
        tg.train(model, self.hp, self.rt)
        self.train_s = time.perf_counter() - t0
        tg.LateQAT.enabled = False
        self.state = copy.deepcopy(model.state_dict())

    def model(self):
        model = tg.GPT(self.hp)
        model.load_state_dict(self.state)
        return model

    def hp_with(self, **overrides):
        return tg.Hyperparameters.from_env(env_for(self.data_path, **overrides))

    def ttt(self, tokens, **overrides):
        return tg.eval_ttt(self.model(), tokens, self.hp_with(**overrides), self.rt, self.tables,
                           time.perf_counter())

    def sliding(self, tokens):
        return tg.eval_sliding(self.model(), tokens, self.hp, self.rt, self.tables)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    return Trained(tiny_data, tmp_path_factory.mktemp("ttt_trained"))


def repeated_passage(n_repeats=5, length=640, seed=0):
    """A random token sequence (640 > EVAL_SEQ_LEN, so no window can see the previous copy) repeated: only
    weights adapted on earlier chunks can exploit the repeats."""
    g = torch.Generator().manual_seed(seed)
    passage = torch.randint(0, 1024, (length,), generator=g)
    return torch.cat([passage] * n_repeats + [passage[:1]])


def test_ttt_lowers_bpb_on_repeated_passages(trained, scored_counts):
    tokens = repeated_passage()
    _, base_bpb = trained.sliding(tokens)  # what TTT_ENABLED=0 reports
    counts = scored_counts(len(tokens) - 1)
    loss, bpb, adapted, n_chunks = trained.ttt(tokens)
    print(f"repeated passage: no-ttt bpb {base_bpb:.4f}  ttt bpb {bpb:.4f}")
    assert (adapted, n_chunks) == (6, 7)
    assert torch.equal(counts, torch.ones_like(counts))
    # measured on the reference box: 3.41 -> 2.79
    assert bpb - base_bpb < -0.3


@pytest.mark.parametrize("overrides", [dict(TTT_EPOCHS=0), dict(TTT_LR=0.0)], ids=["epochs0", "lr0"])
def test_no_adaptation_equals_sliding_eval(trained, overrides):
    # With TTT_CHUNK_TOKENS a multiple of EVAL_STRIDE (and >= EVAL_SEQ_LEN) the per-chunk windows are exactly
    # the sliding-window eval's windows, so without adaptation the two numbers must agree.
    tokens = trained.val[:2049]
    loss, bpb = trained.sliding(tokens)
    ttt_loss, ttt_bpb, adapted, n_chunks = trained.ttt(tokens, **overrides)
    assert (adapted, n_chunks) == (3, 4)
    assert abs(ttt_loss - loss) < 1e-9 and abs(ttt_bpb - bpb) < 1e-9


def test_chunk_epochs_entropy_adaptive(monkeypatch):
    hp = tg.Hyperparameters.from_env({"TTT_EPOCHS": "5"})
    assert [tg.chunk_epochs(hp, x) for x in (0.5, 1.75, 3.0)] == [5, 5, 5]  # off: always TTT_EPOCHS
    hp = tg.Hyperparameters.from_env({"TTT_EPOCHS": "5", "TTT_ENTROPY_ADAPT": "1"})
    assert tg.TTT_ENTROPY_BOUNDS == (1.75, 2.1)
    got = [tg.chunk_epochs(hp, x) for x in (0.0, 1.0, 1.7499, 1.75, 1.9, 2.1, 2.1001, 2.5, 9.0)]
    assert got == [2, 2, 2, 3, 3, 3, 4, 4, 4]
    monkeypatch.setattr(tg, "TTT_ENTROPY_BOUNDS", (3.0, 4.0))  # the bounds are read at each call
    assert [tg.chunk_epochs(hp, x) for x in (2.9, 3.5, 4.1)] == [2, 3, 4]


def test_budget_guard_stops_adapting_but_scores_everything(trained, tmp_path, scored_counts):
    tokens = trained.val[:2049]
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    counts = scored_counts(len(tokens) - 1)
    loss, bpb, adapted, n_chunks = tg.eval_ttt(trained.model(), tokens, trained.hp_with(EVAL_BUDGET_SECONDS=0),
                                               rt, trained.tables, time.perf_counter())
    assert (adapted, n_chunks) == (0, 4)
    assert torch.equal(counts, torch.ones_like(counts))
    assert "ttt:budget stop adapting at chunk 0/4" in (tmp_path / "log.txt").read_text()
    sliding_loss, sliding_bpb = trained.sliding(tokens)  # nothing adapted: the plain sliding-window number
    assert abs(loss - sliding_loss) < 1e-9 and abs(bpb - sliding_bpb) < 1e-9


@pytest.mark.slow
def test_two_ranks_match_one_rank(trained, tmp_path):
    tokens = trained.val[:3073]  # 6 chunks of 512
    configs = [{}, dict(TTT_ENTROPY_ADAPT=1)]
    # Muon's comms in fp32 (MUON_COMM_DTYPE; bf16 in a run) for an exact match: bf16 moved the loss by 1.4e-5
    results = run_ranks(tmp_path, trained.env, trained.state, tokens, trained.tables, configs,
                        constants={"TTT_BATCH_SEQS": BATCH_SEQS, "MUON_COMM_DTYPE": torch.float32})
    for config, (per_rank, counts) in zip(configs, results):
        one = trained.ttt(tokens, **config)
        two = per_rank[0]
        print(f"{config}: 1 rank loss {one[0]:.10f} bpb {one[1]:.10f}; 2 ranks loss {two[0]:.10f} bpb {two[1]:.10f}")
        assert torch.equal(counts, torch.ones_like(counts))
        assert two[2:] == one[2:] == (5, 6)
        # float32 sums reduced in a different order across ranks: measured |diff| ~3e-8
        assert abs(two[0] - one[0]) < 1e-5 and abs(two[1] - one[1]) < 1e-5
        assert one[1] < trained.sliding(tokens)[1]  # and the adaptation did something


def test_benchmark_report(trained):
    """Prints bpb and wall time on the trained tiny model's 8193 validation tokens (TTT_CHUNK_TOKENS=1024)."""
    tokens = trained.val
    rows = []
    t0 = time.perf_counter()
    loss, bpb = trained.sliding(tokens)
    rows.append(("no TTT (sliding, stride 64)", bpb, time.perf_counter() - t0, "-"))
    variants = [("Muon 2 epochs lr 0.02", dict(TTT_EPOCHS=2)),
                ("Muon + entropy-adaptive epochs", dict(TTT_ENTROPY_ADAPT=1))]
    for name, overrides in variants:
        t0 = time.perf_counter()
        loss, bpb, adapted, n_chunks = trained.ttt(tokens, TTT_CHUNK_TOKENS=1024, **overrides)
        rows.append((name, bpb, time.perf_counter() - t0, f"{adapted}/{n_chunks}"))
    print(f"\nTTT benchmark: tiny model ({trained.hp.num_layers}x{trained.hp.model_dim}) trained 30 steps on CPU "
          f"in {trained.train_s:.1f}s, {len(tokens) - 1} val predictions, float weights")
    for name, bpb, seconds, adapted in rows:
        print(f"  {name:32s} bpb {bpb:.4f}  wall {seconds:6.2f}s  chunks_adapted {adapted}")
    assert rows[1][1] < rows[0][1]  # Muon TTT beats no TTT on natural text (measured 3.974 -> ~3.89)
