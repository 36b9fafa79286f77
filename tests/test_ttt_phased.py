"""TTT_MODE=phased: per-document LoRA adapters scored chunk by chunk, with global phases on the base weights.

What it guarantees a grader, on a seeded random-init tiny model and synthetic documents (no ../shared needed):
- every prediction is scored exactly once, its score fixed before any update (adapter or global) that used it:
  changing a token never moves a score made before it in processing order, bit for bit;
- one document's adapter never reaches another document, except through the documented warm A (the next batch's
  document in the same row), and a document's last chunk never trains anything;
- the global phases train on exactly the documents scored so far, one pass each, and on nothing else;
- on 2 gloo ranks every prediction is scored once and the global phases give the 1-rank result (the adapters'
  warm A depends on which batches a rank ran before, so adapted scores do depend on the rank count);
- the budget guard adapts every batch of a run that fits, and otherwise stops adapting, never scoring;
- the batches are the record's (consecutive lengths), queued longest first and dealt by cost, rows sized to the
  documents still running, and the compiled graphs few.
Scores are observed by test-side instrumentation (a wrapper around tg.padded_batch plus a forward hook).
"""
import sys
import time

import pytest
import torch

import train_gpt_human as tg
from conftest import REPO, TOKENIZER_1024, count_scores
from test_ttt_legality import make_env, run_ranks, synthetic_tables

sys.path.insert(0, str(REPO / "tools"))
import ttt_modes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# 14 documents of 46, 44, ..., 20 predictions (BOS included), in a shuffled stream order.  TTT_DOC_BATCH=2 pairs
# neighbouring lengths; queued longest first, with TTT_PREFIX_DOCS=8 and TTT_PHASES=2 they form the groups [46..40],
# [38..32] (each followed by a global phase) and [30..20]; DOC_CHUNK=8 gives chunks of 8, and EVAL_SEQ_LEN=32
# caps the context.  The module constants of CONSTANTS are set for every test (autouse fixture).
LENGTHS = list(range(46, 18, -2))
GROUPS = [LENGTHS[:4], LENGTHS[4:8], LENGTHS[8:]]
RANGE = 340  # group g's tokens (BOS aside) use ids [2 + g * RANGE, 2 + (g + 1) * RANGE): an id names its group
PHASED = dict(TTT_MODE="phased", TTT_DOC_BATCH=2, TTT_PHASES=2, EVAL_SEQ_LEN=32, EVAL_STRIDE=16,
              TTT_CHUNK_TOKENS=64, TTT_LORA_LR=0.01)
CONSTANTS = dict(DOC_CHUNK=8, TTT_PREFIX_DOCS=8, TTT_BATCH_SEQS=2, TTT_PAUSE_RANKS=1)
DEFAULTS = {name: getattr(tg, name) for name in CONSTANTS}  # the trainer's own values
RECORD = dict(PRESET="record", NUM_LAYERS=4, LOOP_START=1, LOOP_END=2, PARALLEL_START=3, ENGRAM_BUCKETS=0, VE_DIM=0)


@pytest.fixture(autouse=True)
def phased_constants(monkeypatch):
    for name, value in CONSTANTS.items():
        monkeypatch.setattr(tg, name, value)


def make_hp(**overrides):
    return tg.Hyperparameters.from_env(make_env(**{**PHASED, **overrides}))


def documents(seed=0):
    """(tokens, {length: (begin, end)}): the documents in a shuffled order, then one BOS (the last target)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(LENGTHS), generator=g).tolist()
    parts, spans, pos = [], {}, 0
    for n in (LENGTHS[i] for i in order):
        group = next(k for k, lengths in enumerate(GROUPS) if n in lengths)
        parts.append(torch.cat([torch.tensor([tg.BOS_ID]),
                                torch.randint(2 + group * RANGE, 2 + (group + 1) * RANGE, (n - 1,), generator=g)]))
        spans[n], pos = (pos, pos + n), pos + n
    return torch.cat(parts + [torch.tensor([tg.BOS_ID])]), spans


def random_model(hp, seed=0):
    torch.manual_seed(seed)
    model = tg.GPT(hp)
    if hp.attn_out_init == "zero":  # the record's zero attention outputs would hide every attention effect
        with torch.no_grad():
            model.qo[hp.num_layers:].normal_(std=0.05)
    return model


class Recorder:
    """Per-prediction scores and how often each was scored (from the doc batches' forwards), and every global-phase
    forward (sequences, mask, and which predictions had been scored by then)."""

    def __init__(self, monkeypatch, model, tokens):
        self.scores = torch.full((len(tokens) - 1,), float("nan"), dtype=torch.float64)
        self.times_scored = torch.zeros(len(tokens) - 1, dtype=torch.int64)
        self.global_steps = []
        pending, original = [], tg.padded_batch

        def padded_batch(toks, windows, rows, seq_len, hp, device, isolate=True):
            x, y, docs, mask = original(toks, windows, rows, seq_len, hp, device, isolate)
            seqs = torch.cat([x, y[:, -1:]], dim=1)
            pending.append((toks is tokens, windows, seqs, mask))
            return x, y, docs, mask

        def hook(module, args, output):
            is_doc_batch, windows, seqs, mask = pending.pop()
            assert torch.equal(args[0], seqs[:, :-1])
            nll = output.detach().view(mask.shape).double()
            if not is_doc_batch:
                self.global_steps.append((seqs, mask, self.times_scored.clone()))
                return
            for r, (start, length, score_from) in enumerate(windows):
                assert torch.equal(mask[r].nonzero().flatten(), torch.arange(score_from, length))
                self.scores[start + score_from:start + length] = nll[r, score_from:length]
                self.times_scored[start + score_from:start + length] += 1

        monkeypatch.setattr(tg, "padded_batch", padded_batch)
        model.register_forward_hook(hook)


def run_phased(monkeypatch, tmp_path, tokens, **overrides):
    """eval_ttt on a fresh seeded model; returns (result, Recorder, counts: how often each prediction was
    scored)."""
    hp = make_hp(**overrides)
    model = random_model(hp)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    with monkeypatch.context() as patch:
        rec = Recorder(patch, model, tokens)
        counts = count_scores(patch, len(tokens) - 1)
        result = tg.eval_ttt(model, tokens, hp, rt, synthetic_tables(), time.perf_counter())
    return result, rec, counts


def test_split_documents_tile_every_prediction_once():
    B = tg.BOS_ID
    for seq in ([B, 5, 6, B, 7, B, B, 8, 9], [5, 6, B, 7, 8], [B, 5, 6, 7], [5, B], [B, B, B], [5, 6]):
        tokens = torch.tensor(seq)
        docs = tg.split_documents(tokens)
        assert [b for b, _ in docs] == sorted({0} | {i for i, t in enumerate(seq[:-1]) if t == B})
        assert docs[0][0] == 0 and docs[-1][1] == len(seq) - 1
        assert all(e == b2 for (_, e), (b2, _) in zip(docs, docs[1:]))  # contiguous: each prediction once
        assert all(b < e for b, e in docs)
    assert tg.split_documents(torch.tensor([B, 5, 6, B, 7, B, B, 8, 9])) == [(0, 3), (3, 5), (5, 6), (6, 8)]


@pytest.mark.parametrize("preset", ["seed", "record"])
def test_adapters_one_per_virtual_layer_and_one_row_per_document(preset, monkeypatch):
    monkeypatch.setattr(tg, "LORA_RANK", 4)
    hp = make_hp(**(RECORD if preset == "record" else {}), TTT_DOC_BATCH=2)
    model = random_model(hp)
    model.eval()
    with torch.no_grad():
        model.mlp_down.normal_(std=0.05)  # zero at init, which would hide the up projection's adapter
    n_virtual = sum(map(len, tg.layer_order(hp, model.looping)))
    assert n_virtual == (8 if preset == "record" else 2)  # record: layers 0, 1, 2, 1, 2, 1, 2, 3
    lora = tg.LoRA(model, 2, seed=0)
    targets = 3 if preset == "record" else 5  # q, k, v, attention output, MLP bypass (the record: no q, v); the head
    assert len(lora.A) == len(lora.B) == targets * n_virtual + 1
    assert all(a.shape[:2] == (2, 4) and b.shape[0] == 2 and b.shape[2] == 4 for a, b in zip(lora.A, lora.B))
    ids = torch.randint(2, 1024, (2, 24), generator=torch.Generator().manual_seed(1))
    base = model(ids, ids, reduction="none").view(2, -1)
    model.lora = lora
    with torch.no_grad():
        assert torch.equal(model(ids, ids, reduction="none").view(2, -1), base)  # B = 0: the base model
        for i, b in enumerate(lora.B):  # every pair is used, and only by its own row (document)
            b[1].normal_()
            out = model(ids, ids, reduction="none").view(2, -1)
            assert torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1]), f"pair {i}"
            b.zero_()
        drawn = [a.clone() for a in lora.A]
        assert all(not torch.equal(a[0], a[1]) for a in drawn)  # independent draws per row
        for a in lora.A:
            a.add_(1.0)
        lora.B[0].normal_()
        lora.reset()  # B back to zero, A kept (warm)
        assert all(not b.any() for b in lora.B)
        assert all(torch.equal(a, d + 1) for a, d in zip(lora.A, drawn))
    # A is drawn once per LoRA, from its seed
    assert all(torch.equal(a, d) for a, d in zip(tg.LoRA(model, 2, seed=0).A, drawn))
    assert all(not torch.equal(a, d) for a, d in zip(tg.LoRA(model, 2, seed=1).A, drawn))


@pytest.mark.parametrize("preset", ["seed", "record"])
def test_scored_once_and_global_phases_train_on_exactly_the_scored_documents(monkeypatch, tmp_path, preset):
    tokens, spans = documents()
    overrides = RECORD if preset == "record" else {}
    (loss, bpb, adapted, n_batches), rec, counts = run_phased(monkeypatch, tmp_path, tokens, **overrides)
    P = len(tokens) - 1
    assert (adapted, n_batches) == (7, 7)
    assert torch.equal(counts, torch.ones(P, dtype=torch.int64))
    assert torch.equal(rec.times_scored, counts)
    assert loss == pytest.approx(float(rec.scores.mean()), rel=1e-12)
    log = (tmp_path / "log.txt").read_text()
    assert "ttt:start mode:phased docs:14 batches:7 segments:[2, 2, 1, 1, 1] " in log  # 2 phases, 3 guard points
    phases = {}  # predictions scored by then -> that phase's forwards
    for seqs, mask, scored in rec.global_steps:
        phases.setdefault(int(scored.sum()), []).append((seqs, mask, scored))
    assert sorted(phases) == [sum(GROUPS[0]), sum(GROUPS[0]) + sum(GROUPS[1])]
    for k, steps in enumerate(phases[n] for n in sorted(phases)):
        done = [spans[n] for group in GROUPS[:k + 1] for n in group]
        scored = torch.zeros(P, dtype=torch.int64)
        for b, e in done:
            scored[b:e] = 1
        assert all(torch.equal(step[2], scored) for step in steps)
        inputs = torch.cat([s[:, :-1][m] for s, m, _ in steps])
        targets = torch.cat([s[:, 1:][m] for s, m, _ in steps])
        # only tokens of the groups scored so far (an id names its group) ...
        assert int(inputs.max()) < 2 + (k + 1) * RANGE and int(targets.max()) < 2 + (k + 1) * RANGE
        # ... and exactly the scored documents' targets, once each: one pass
        expected = sum(torch.bincount(tokens[b + 1:e + 1], minlength=1024) for b, e in done)
        assert torch.equal(torch.bincount(targets, minlength=1024), expected)


def changed(base, rec, span):
    b, e = span
    return not torch.equal(base.scores[b:e], rec.scores[b:e])


def test_score_first_and_no_leak_between_documents(monkeypatch, tmp_path):
    """Change one target in chunk 1 of the first document of group 1 (batch 0, row 0): every score made before it
    in processing order keeps its bits; group 2, scored after the global phase that trained on it, moves."""
    tokens, spans = documents()
    _, base, _ = run_phased(monkeypatch, tmp_path, tokens)
    b, e = spans[38]
    t = b + 12  # the target of prediction b + 11 (chunk 1 of 5)
    tokens2 = tokens.clone()
    tokens2[t] = 2 + RANGE + (tokens[t] - 2 - RANGE + 1) % RANGE
    _, rec, _ = run_phased(monkeypatch, tmp_path, tokens2)
    assert torch.equal(rec.scores[b:t - 1], base.scores[b:t - 1]) and rec.scores[t - 1] != base.scores[t - 1]
    for n in GROUPS[0] + [36, 32]:  # scored earlier, or in the same batch, or in the other row
        assert not changed(base, rec, spans[n]), n
    assert changed(base, rec, spans[34])  # batch 1, row 0: reached only through the warm A
    assert all(changed(base, rec, spans[n]) for n in GROUPS[2])  # the global phase after group 1 used it


def test_last_chunk_never_trains(monkeypatch, tmp_path):
    """In the last group (no global phase after it): a change inside a document's last chunk reaches nothing
    else, while the same change in its first chunk reaches the later batches' documents in its row (the warm
    A)."""
    tokens, spans = documents()
    _, base, _ = run_phased(monkeypatch, tmp_path, tokens)
    b, e = spans[30]  # group 2, batch 0, row 0: chunks of 8, 8, 8, 6
    for t, leaks in ((e - 2, False), (b + 5, True)):
        tokens2 = tokens.clone()
        tokens2[t] = 2 + 2 * RANGE + (tokens[t] - 2 - 2 * RANGE + 1) % RANGE
        _, rec, _ = run_phased(monkeypatch, tmp_path, tokens2)
        assert torch.equal(rec.scores[b:t - 1], base.scores[b:t - 1]) and rec.scores[t - 1] != base.scores[t - 1]
        for n in LENGTHS:
            if n != 30:  # only row 0 of the later batches (26, 22) may move, and only through the warm A
                assert changed(base, rec, spans[n]) == (leaks and n in (26, 22)), (t - b, n)


def test_fresh_adapters_score_each_document_in_its_own_context(monkeypatch, tmp_path):
    """No adaptation (budget 0) equals adapters at LR 0 without phases, and both equal the base model run on each
    document alone (EVAL_SEQ_LEN 64 holds every document): context is the document's own earlier tokens."""
    tokens, spans = documents()
    (loss, bpb, adapted, n), rec, counts = run_phased(monkeypatch, tmp_path, tokens, EVAL_SEQ_LEN=64,
                                                      EVAL_BUDGET_SECONDS=0)
    assert (adapted, n) == (0, 7) and torch.equal(counts, torch.ones_like(counts))
    assert "ttt:budget segment 1/5: adapting 0/2 batches, then no more" in (tmp_path / "log.txt").read_text()
    (loss0, bpb0, adapted0, _), _, _ = run_phased(monkeypatch, tmp_path, tokens, EVAL_SEQ_LEN=64, TTT_LORA_LR=0,
                                                  TTT_PHASES=0)
    assert adapted0 == 7 and loss0 == pytest.approx(loss, rel=1e-6) and bpb0 == pytest.approx(bpb, rel=1e-6)
    model = random_model(make_hp(EVAL_SEQ_LEN=64))
    with torch.no_grad():
        for b, e in spans.values():
            alone = model(tokens[None, b:e], tokens[None, b + 1:e + 1], reduction="none").double()
            assert torch.allclose(rec.scores[b:e], alone, rtol=1e-5, atol=1e-6)


def test_phase_boundaries_follow_the_records_queue_on_n_ranks(monkeypatch):
    """Batches (index: lengths) 0: 20, 22 ... 6: 44, 46 cost 96 ... 288 row-tokens and are queued longest first.  On
    2 ranks, the record's queue pauses for phase 1 (4 documents) once batches 6 and 5 are done (at cost-time 288),
    having started batch 4 too; for phase 2 (8) after batch 3 of 3 and 2.  The rest is cut for the budget guard."""
    tokens, _ = documents()
    hp = make_hp()
    monkeypatch.setattr(tg, "TTT_PAUSE_RANKS", 2)
    docs = sorted(tg.split_documents(tokens), key=lambda d: d[1] - d[0])
    batches = [docs[i:i + 2] for i in range(0, 14, 2)]
    costs = [tg.doc_batch_cost(b, hp) for b in batches]
    segments, phases = tg.phase_segments([6, 5, 4, 3, 2, 1, 0], batches, costs, hp)
    assert (segments, phases) == ([[6, 5, 4], [3, 2], [1], [0]], 2)
    lengths = [sorted(e - b for b, e in tg.phase_docs(segments, batches, k, hp)) for k in range(2)]
    assert lengths == [[36, 38, 40, 42], list(range(28, 43, 2))]  # the shortest of the documents scored by then
    monkeypatch.setattr(tg, "TTT_PAUSE_RANKS", 1)
    one_rank = tg.phase_segments([6, 5, 4, 3, 2, 1, 0], batches, costs, hp)
    assert one_rank == ([[6, 5], [4, 3], [2], [1], [0]], 2)  # TTT_PAUSE_RANKS=1: exactly at the boundaries
    assert tg.deal([6, 5, 4, 3, 2], costs, 2) == [[6, 3, 2], [5, 4]]  # loads 288+192+160 and 256+224


def run_on_a_fake_clock(monkeypatch, tmp_path, seconds_per_row_token, budget, world_size=1, rank=0, prior=(0.0, 0.0)):
    """Phased TTT where a document batch takes exactly its row-tokens x the rate and a global phase 5 ms per token, on
    a fake clock, so that the guard's decisions are exact.  Returns (result, log)."""
    clock = [0.0]
    monkeypatch.setattr(tg.time, "perf_counter", lambda: clock[0])
    plain_batch, plain_phase = tg.score_doc_batch, tg.global_phase

    def timed_batch(model, lora, tokens, docs, hp, *args, **kwargs):
        clock[0] += tg.doc_batch_cost(docs, hp) * seconds_per_row_token
        return plain_batch(model, lora, tokens, docs, hp, *args, **kwargs)

    def timed_phase(model, tokens, docs, hp, rt):
        clock[0] += 0.005 * sum(e - b for b, e in docs)
        return plain_phase(model, tokens, docs, hp, rt)

    monkeypatch.setattr(tg, "score_doc_batch", timed_batch)
    monkeypatch.setattr(tg, "global_phase", timed_phase)
    tokens, _ = documents()
    hp = make_hp(EVAL_BUDGET_SECONDS=budget)
    counts = count_scores(monkeypatch, len(tokens) - 1)
    rt = tg.Runtime(rank, world_size, torch.device("cpu"), str(tmp_path / "log.txt"))
    result = tg.eval_ttt(random_model(hp), tokens, hp, rt, synthetic_tables(), 0.0, prior)
    assert torch.equal(counts, torch.ones_like(counts))  # whatever the guard does, every prediction once
    return result, (tmp_path / "log.txt").read_text()


def test_budget_guard_adapts_every_batch_of_a_run_that_fits(monkeypatch, tmp_path):
    """Batches cost 288, 256, 224, 192, 160, 128, 96 row-tokens (1,344 in all) at 0.01 s each, plus global phases on
    172 and 312 predictions at 5 ms: 15.86 s.  A 16 s budget adapts everything; the guard never speaks."""
    tokens, _ = documents()
    docs = sorted(tg.split_documents(tokens), key=lambda d: d[1] - d[0])
    costs = [tg.doc_batch_cost(docs[i:i + 2], make_hp()) for i in range(0, 14, 2)]
    assert costs == [96, 128, 160, 192, 224, 256, 288]
    (_, _, adapted, n), log = run_on_a_fake_clock(monkeypatch, tmp_path, 0.01, 16.0)
    assert (adapted, n) == (7, 7) and "ttt:budget" not in log


@pytest.mark.parametrize("budget, adapted, said", [
    (15.0, 6, "segment 5/5: adapting 0/1"), (13.0, 4, "segment 3/5: adapting 0/1"),
    (10.2, 3, "segment 2/5: adapting 1/2"), (10.0, 2, "segment 2/5: adapting 0/2")])
def test_budget_guard_stops_adapting_where_the_budget_ends(monkeypatch, tmp_path, budget, adapted, said):
    """Segment 1 (5.44 s, then a 0.86 s phase) runs before any rate is known.  At segment 2, 6.30 s have passed and
    the phase after it will take about 1.56 s (the rate of the first phase): its batches (2.24 s, then 1.92 s) fit
    from a budget of 10.1 s and 12.02 s; segments 3, 4, 5 (1.6, 1.28, 0.96 s) from 13.62, 14.9 and 15.86 s."""
    (_, _, got, n), log = run_on_a_fake_clock(monkeypatch, tmp_path, 0.01, budget)
    assert (got, n) == (adapted, 7), log
    assert f"ttt:budget {said} batches, then no more" in log


@pytest.mark.parametrize("budget, adapted", [(0.0, 0), (1.0, 0), (3.0, 1), (5.5, 2)])
def test_budget_guard_pays_for_the_first_segment_with_the_warm_up_rate(monkeypatch, tmp_path, budget, adapted):
    """With the warm-up's rate (0.01 s per row-token), the first segment adapts only what the budget pays for: its
    batches cost 2.88 s, then 2.56 s; a budget of 0 or 1 s adapts nothing at all, and every prediction is still
    scored once.  Without a rate (no warm-up) the first segment would adapt both batches whatever the budget."""
    (_, _, got, n), log = run_on_a_fake_clock(monkeypatch, tmp_path, 0.01, budget, prior=(1.0, 100.0))
    assert (got, n) == (adapted, 7), log
    assert (f"ttt:budget segment 1/5: adapting {adapted}/2 batches, then no more" in log) == (adapted < 2)


def test_warm_up_measures_the_guards_first_rate(monkeypatch, tmp_path):
    """warm_up_ttt times its second many-row batch: (seconds, row-tokens) on the fake clock's rate."""
    clock = [0.0]
    monkeypatch.setattr(tg.time, "perf_counter", lambda: clock[0])
    plain_batch = tg.score_doc_batch

    def timed_batch(model, lora, tokens, docs, hp, *args):
        clock[0] += tg.doc_batch_cost(docs, hp) * 0.01
        return plain_batch(model, lora, tokens, docs, hp, *args)

    monkeypatch.setattr(tg, "score_doc_batch", timed_batch)
    hp = make_hp()
    seconds, row_tokens = tg.warm_up_ttt(random_model(hp), hp, tg.Runtime(0, 1, torch.device("cpu"),
                                                                           str(tmp_path / "log.txt")),
                                         synthetic_tables())
    assert row_tokens > 0 and seconds == pytest.approx(0.01 * row_tokens)


def test_row_groups_score_and_train_exactly_like_whole_batches(monkeypatch, tmp_path):
    """TTT_STEP_TOKENS splits a step's rows into forwards of at most that many row-tokens, with one optimizer step
    over their summed gradients: in float64, the same scores and the same adapters as unsplit, to 1e-9."""
    torch.set_default_dtype(torch.float64)
    try:
        tokens, _ = documents()
        runs = {}
        for cap in (10**6, 16, 1):  # whole batches; 1 or 2 rows per forward; one row per forward
            hp = make_hp(TTT_STEP_TOKENS=cap, TTT_DOC_BATCH=4, TTT_PHASES=0)
            model = random_model(hp).double()
            forwards = []
            model.register_forward_hook(lambda m, args, out: forwards.append(args[0].shape[0]))
            result = tg.eval_ttt(model, tokens, hp, tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "l.txt")),
                                 synthetic_tables(), time.perf_counter())
            runs[cap] = result, max(forwards), len(forwards)
    finally:
        torch.set_default_dtype(torch.float32)
    (whole, rows, n), (split, rows_split, n_split), (single, rows_one, _) = runs.values()
    assert rows == 4 and rows_split < 4 and rows_one == 1 and n_split > n
    assert whole[2:] == split[2:] == single[2:]
    assert abs(whole[0] - split[0]) < 1e-9 and abs(whole[0] - single[0]) < 1e-9 and whole[0] != 0


@pytest.mark.slow  # two spawned gloo processes
def test_two_ranks_score_once_and_share_the_global_phases(tmp_path):
    """Batches dealt to 2 ranks (one idles in group 2's last round): every prediction is scored once and both
    ranks report the same numbers.  With the adapters at LR 0 (each stays the base model) the result is the
    1-rank one, global phases included: their steps are shared over the ranks.  With the adapters learning it
    may differ a little: a batch's warm A is the one left by the batch before it on the same rank."""
    tokens, _ = documents()
    hp = make_hp()
    state = random_model(hp).state_dict()
    configs = [dict(TTT_LORA_LR=0), {}]
    results = run_ranks(tmp_path, make_env(**PHASED), state, tokens, synthetic_tables(), configs,
                        constants=CONSTANTS)
    for config, (per_rank, counts) in zip(configs, results):
        assert torch.equal(counts, torch.ones(len(tokens) - 1, dtype=torch.int64)), config
        assert per_rank[0] == per_rank[1] and per_rank[0][2:] == (7, 7)
        model = random_model(hp)
        model.load_state_dict(state)
        one = tg.eval_ttt(model, tokens, make_hp(**config), tg.Runtime(0, 1, torch.device("cpu"),
                          str(tmp_path / "log1.txt")), synthetic_tables(), time.perf_counter())
        print(f"{config}: 1 rank {one[:2]}  2 ranks {per_rank[0][:2]}")
        tolerance = 1e-5 if config else 0.02  # measured |diff|: 1e-9 at LR 0; 3.7e-3 (loss) adapting
        assert abs(one[0] - per_rank[0][0]) < tolerance and abs(one[1] - per_rank[0][1]) < tolerance, config


def test_ttt_modes_tool(tiny_data, tmp_path, monkeypatch):
    """tools/ttt_modes.py trains once and evaluates every mode on the same tokens: a mode that adapts nothing reports
    the sliding-window number, and the per-second columns are what they say."""
    for name, value in dict(DEFAULTS, LORA_RANK=4, TTT_PREFIX_DOCS=1).items():
        monkeypatch.setattr(tg, name, value)
    env = dict(ttt_modes.TINY, DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(TOKENIZER_1024), ITERATIONS="4",
               VAL_MAX_TOKENS="2049", TTT_CHUNK_TOKENS="512", EVAL_BATCH_SEQS="8", TTT_DOC_BATCH="4",
               TTT_PHASES="1")
    modes = [ttt_modes.parse_mode(m) for m in ("still:TTT_EPOCHS=0", "phased:TTT_MODE=phased,TTT_LORA_LR=0.001")]
    assert modes[1] == ("phased", {"TTT_MODE": "phased", "TTT_LORA_LR": "0.001"})
    rows = ttt_modes.compare(env, modes, str(tmp_path / "log.txt"))
    assert [r["mode"] for r in rows] == ["sliding", "still", "phased"]
    assert rows[1]["val_bpb"] == pytest.approx(rows[0]["val_bpb"], abs=1e-9) and rows[1]["adapted"] == "3/4"
    assert rows[2]["val_bpb"] != rows[0]["val_bpb"] and "ttt:start mode:phased" in (tmp_path / "log.txt").read_text()
    for row in rows:
        assert row["predictions_per_s"] == pytest.approx(2048 / row["seconds"])
    for row in rows[1:]:
        extra = row["seconds"] - rows[0]["seconds"]  # no extra time (a mode as fast as sliding): no rate
        expected = (rows[0]["val_bpb"] - row["val_bpb"]) / extra if extra > 0 else None
        assert row["gain_per_extra_s"] == (None if expected is None else pytest.approx(expected))
    assert len(ttt_modes.table(rows).splitlines()) == 5
