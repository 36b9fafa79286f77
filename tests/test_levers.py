"""The frontier's levers (#2014, #2060, #2135) as settings of the one model and eval path: each does what it says."""
import dataclasses
import time

import pytest
import torch

import train_gpt_human as tg
from conftest import TINY_ENV


def test_seq_schedule_parses_caps_and_rejects():
    hp = tg.Hyperparameters(train_seq_len=3072, train_seq_schedule="1024@0.1,2048@0.7")
    assert hp.seq_stages() == [(1024, 0.1), (2048, 0.7), (3072, 1.0)]
    assert dataclasses.replace(hp, train_seq_len=1536).seq_stages() == [(1024, 0.1), (1536, 0.7), (1536, 1.0)]
    assert tg.Hyperparameters().seq_stages() == [(2048, 1.0)]
    for bad in ("1024", "1024@x", "2048@0.7,1024@0.1", "0@0.5", "1024@1.5"):
        with pytest.raises(tg.ConfigError, match="TRAIN_SEQ_SCHEDULE"):
            tg.Hyperparameters.from_env({"TRAIN_SEQ_SCHEDULE": bad})
    with pytest.raises(tg.ConfigError, match=r"x GRAD_ACCUM_STEPS\(1\) x the TRAIN_SEQ_SCHEDULE context \(1000\)"):
        tg.grad_accum_steps(tg.Hyperparameters(train_seq_schedule="1000@0.5"), 8)


def test_training_shapes_are_the_stages_times_the_loop_switch():
    """#2014's warm-up set: 1024 plain, 2048 plain and looped (the loops switch on at 0.35), 3072 looped."""
    hp = tg.Hyperparameters.from_env({"PRESET": "record", "TRAIN_SEQ_SCHEDULE": "1024@0.1,2048@0.7",
                                      "TRAIN_SEQ_LEN": "3072"})
    assert tg.training_shapes(hp) == [(1024, False), (2048, False), (2048, True), (3072, True)]
    assert tg.training_shapes(tg.Hyperparameters()) == [(2048, False)]  # the seed: no loops, one context
    assert tg.training_shapes(dataclasses.replace(hp, train_seq_schedule="")) == [(3072, False), (3072, True)]


def test_progressive_context_switches_by_progress_and_rewarms_the_lr(tiny_data, tmp_path, monkeypatch):
    """Context 32 while progress <= 0.2, 64 while <= 0.6, then 128; the loops from 0.5; after each switch the LR
    ramps back up over 4 steps; the warm-up visits every (context, looping) graph once; no segment is longer than
    the context of its step."""
    env = dict(TINY_ENV, DATA_PATH=str(tiny_data), ITERATIONS="20", TRAIN_SEQ_SCHEDULE="32@0.2,64@0.6",
               WARMUP_STEPS="4", DOC_ISOLATION="1", NUM_LOOPS="1", LOOP_START="1", LOOP_END="1",
               TRAIN_LOG_EVERY="100")
    monkeypatch.setattr(tg, "SEQ_CHANGE_WARMUP_STEPS", 4)
    monkeypatch.setattr(tg, "LOOP_ENABLE_AT", 0.5)
    hp = tg.Hyperparameters.from_env(env)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    seen, real_step = [], tg.train_step

    def spy(model, opt, loader, rt, accum, scale):
        real_next = loader.next_batch

        def next_batch(accum):
            x, y, (cu, max_len) = real_next(accum)
            # segments are cut at the step's context; FlashAttention's max_seqlen is the longest stage's, so a
            # context switch changes no argument of the compiled graph: one graph per loops state
            assert max_len == 128 and int((cu[1:] - cu[:-1]).max()) <= loader.seq_len
            return x, y, (cu, max_len)

        loader.next_batch = next_batch
        seen.append((loader.seq_len, model.looping, scale))
        return real_step(model, opt, loader, rt, accum, scale)

    monkeypatch.setattr(tg, "train_step", spy)
    torch.manual_seed(0)
    tg.train(tg.GPT(hp), hp, rt)
    assert seen[:4] == [(32, False, 1.0), (64, False, 1.0), (64, True, 1.0), (128, True, 1.0)]  # the warm-up
    contexts = [32] * 5 + [64] * 8 + [128] * 7  # progress = step / 20
    rewarm = {5: 0.25, 6: 0.5, 7: 0.75, 13: 0.25, 14: 0.5, 15: 0.75}
    expected = [(n, step >= 10, pytest.approx(tg.lr_schedule(hp, step, 0.0, 0) * rewarm.get(step, 1.0)))
                for step, n in enumerate(contexts)]
    assert seen[4:] == expected
    log = (tmp_path / "log.txt").read_text()
    assert "train_seq_len:64 step:5 progress:0.250" in log and "train_seq_len:128 step:13 progress:0.650" in log


def test_lora_targets_adapt_only_the_listed_projections(monkeypatch):
    """TTT_LORA_TARGETS=k,o,mlp (#2014, #2060: no Q/V adapters): three pairs per virtual layer plus the head; q and v
    get no delta, k does."""
    from test_ttt_phased import RECORD, make_hp, random_model

    monkeypatch.setattr(tg, "LORA_RANK", 4)
    hp = make_hp(**RECORD, TTT_LORA_TARGETS="k,o,mlp")
    model = random_model(hp)
    n_virtual = sum(map(len, tg.layer_order(hp, model.looping)))
    lora = tg.LoRA(model, 2, seed=0)
    assert len(lora.A) == 3 * n_virtual + 1
    for b in lora.B:
        torch.nn.init.normal_(b)
    x = torch.randn(2, 5, hp.model_dim)
    assert lora.delta(0, "q", x) == 0 and lora.delta(n_virtual - 1, "v", x) == 0
    assert lora.delta(n_virtual - 1, "k", x).shape == (2, 5, model.kv.size(1))
    assert torch.equal(lora.delta(1, "o", x), lora.pair(4, x))  # layer 1's o: the 2nd of its 3 pairs
    with pytest.raises(tg.ConfigError, match="TTT_LORA_TARGETS='q,x' must list some of q,k,v,o,mlp"):
        make_hp(TTT_LORA_TARGETS="q,x")


def test_short_chunks_by_the_batchs_longest_document():
    hp = tg.Hyperparameters(ttt_short_chunks="256:8,2000:24", eval_seq_len=3072)
    # #2014 compares the longest document's length, predictions + 1 (its BOS to the next BOS), with each limit: a
    # document of exactly 256 predictions is 257 long and reads 24 at a time, one of 2,000 the default 48
    assert [tg.doc_chunk([(0, n), (0, 10)], hp) for n in (100, 255, 256, 1999, 2000)] == [8, 8, 24, 24, 48]
    assert tg.doc_steps([(0, 20), (0, 13)], hp) == [(2, 8), (2, 16), (1, 24)]  # 3 chunks of 8; rows as they run
    assert tg.doc_batch_cost([(0, 20), (0, 13)], hp) == 2 * 8 + 2 * 16 + 24
    for bad in ("256", "256:0", "256:4000", "a:8"):
        with pytest.raises(tg.ConfigError, match="TTT_SHORT_CHUNKS"):
            tg.Hyperparameters.from_env({"TTT_SHORT_CHUNKS": bad})


def test_short_chunks_score_each_prediction_once_before_it_trains(monkeypatch, tmp_path, one_thread):
    """TTT_SHORT_CHUNKS=40:4: batches whose longest document is <= 40 predictions read it 4 at a time, the
    rest 8 at a time (DOC_CHUNK); every prediction is scored exactly once, and a changed target moves no score
    made before it."""
    from test_ttt_legality import synthetic_tables
    from test_ttt_phased import CONSTANTS, RANGE, documents, make_hp, random_model, run_phased

    for name, value in CONSTANTS.items():
        monkeypatch.setattr(tg, name, value)
    tokens, spans = documents()
    (_, _, adapted, n_batches), base, counts = run_phased(monkeypatch, tmp_path, tokens,
                                                          TTT_SHORT_CHUNKS="40:4")
    assert (adapted, n_batches) == (7, 7) and torch.equal(counts, torch.ones_like(counts))
    b, e = spans[38]  # batch (38, 36): chunks of 4
    t = b + 10
    tokens2 = tokens.clone()
    tokens2[t] = 2 + RANGE + (tokens[t] - 2 - RANGE + 1) % RANGE
    _, rec, _ = run_phased(monkeypatch, tmp_path, tokens2, TTT_SHORT_CHUNKS="40:4")
    assert torch.equal(rec.scores[b:t - 1], base.scores[b:t - 1]) and rec.scores[t - 1] != base.scores[t - 1]
    hp = make_hp(TTT_SHORT_CHUNKS="40:4", TTT_PHASES=0)  # the forwards are exactly the steps doc_steps plans
    model, shapes = random_model(hp), []
    model.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    tg.eval_ttt(model, tokens, hp, rt, synthetic_tables(), time.perf_counter())
    docs = sorted(tg.split_documents(tokens), key=lambda d: d[1] - d[0])
    planned = [step for i in range(0, 14, 2) for step in tg.doc_steps(docs[i:i + 2], hp)]
    assert sorted(shapes) == sorted(planned) and (2, 4) in shapes and (2, 8) in shapes


def test_lever_report_tool(tiny_data, tmp_path):
    """tools/lever_report.py: a --train variant trains its own model; an --eval variant reuses the first model (same
    float bpb) and changes only its own settings; every artifact fits the budget it was given."""
    import sys

    from conftest import REPO, TOKENIZER_1024

    sys.path.insert(0, str(REPO / "tools"))
    import lever_report
    import ttt_modes

    env = dict(ttt_modes.TINY, DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(TOKENIZER_1024), ITERATIONS="4",
               VAL_MAX_TOKENS="2049", TTT_CHUNK_TOKENS="512", EVAL_BATCH_SEQS="8", GPTQ_CALIB_BATCHES="2")
    train = [lever_report.parse_variant(v) for v in ("base:", "qk:QK_GAIN_INIT=2.0,TRAIN_SEQ_SCHEDULE=64@0.5,128@1")]
    assert train[1] == ("qk", {"QK_GAIN_INIT": "2.0", "TRAIN_SEQ_SCHEDULE": "64@0.5,128@1"})
    rows = lever_report.report(env, train, [("no-ttt", {"TTT_EPOCHS": "0"})], 1.5, str(tmp_path / "log.txt"))
    assert [(r["variant"], r["kind"]) for r in rows] == [("base", "train"), ("qk", "train"), ("no-ttt", "eval")]
    assert rows[2]["float_bpb"] == rows[0]["float_bpb"] != rows[1]["float_bpb"]
    assert rows[2]["quant_bpb"] == pytest.approx(rows[0]["quant_bpb"], abs=1e-9)  # the same model and codes
    assert rows[2]["ttt_bpb"] != rows[0]["ttt_bpb"]  # TTT_EPOCHS=0: scored by sliding windows, nothing adapted
    n_params = sum(p.numel() for p in tg.GPT(tg.Hyperparameters.from_env(env)).parameters())
    assert all(0 < r["bytes"] <= 1.5 * n_params for r in rows)
    assert len(lever_report.table(rows).splitlines()) == 5
