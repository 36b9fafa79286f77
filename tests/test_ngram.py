"""NGRAM_TILT: the token n-gram tilt at evaluation (ngram_tilt, batch_tilt, GPT.forward's `tilt`).

What it guarantees a grader:
- the tilted distribution is a softmax over the whole vocabulary (sums to 1) whose NLL is #2135's closed form;
- a prediction's hint reads only its strict prefix (and, scope doc, only its own document);
- the hints equal a plain dictionary implementation of the definition (tie rule and threshold included);
- with the tilt on every prediction is still scored exactly once (sliding, chunk TTT, phased TTT), and the tilt
  moves the loss only where a hint fires.
A closing measurement (test_corpus_measurement, run with -s) prints the gated fractions and bpb on the shared corpus.
"""
import collections
import math
import re
import time

import numpy as np

import pytest
import torch

import train_gpt_human as tg
from conftest import TINY_ENV, TOKENIZER_8192, count_scores
from test_ttt_legality import make_hp, random_model, synthetic_tables

pytestmark = pytest.mark.usefixtures("one_thread")
B = tg.BOS_ID


def runtime(tmp_path):
    return tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))


def hints_of(tokens, tmp_path, scope, order=16, threshold=0.8, boost=2.625):
    """ngram_tilt with NGRAM_ORDER, NGRAM_THRESHOLD and NGRAM_BOOST set to these."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("NGRAM_ORDER", order), ("NGRAM_THRESHOLD", threshold), ("NGRAM_BOOST", boost)):
            patch.setattr(tg, name, value)
        return tg.ngram_tilt(torch.as_tensor(tokens), make_hp(NGRAM_TILT=scope), runtime(tmp_path))


def reference(tokens, scope, order, threshold, boost):
    """The definition, one prediction at a time: counts of (context, next token) over earlier predictions, the top
    token replaced only by a strictly higher count; hint and boost where top / total >= threshold."""
    t, W = list(tokens), order - 1
    hints, boosts = [0] * (len(t) - 1), [0.0] * (len(t) - 1)
    counts, top, doc = collections.defaultdict(collections.Counter), {}, 0
    for p in range(len(t) - 1):
        doc = p if t[p] == B else doc
        if p - W + 1 < (doc if scope == "doc" else 0):
            continue
        context = (doc if scope == "doc" else None, tuple(t[p - W + 1:p + 1]))
        seen = sum(counts[context].values())
        if seen and top[context][1] / seen >= threshold:
            hints[p], boosts[p] = top[context][0], boost
        y = t[p + 1]
        counts[context][y] += 1
        if context not in top or counts[context][y] > top[context][1]:
            top[context] = (y, counts[context][y])
    return torch.tensor(hints), torch.tensor(boosts)


def repetitive_stream(seed, n_docs=6, length=60, alphabet=4):
    """Documents from a small alphabet (many repeated contexts), each starting with BOS, then a last BOS."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.tensor([B]), 2 + torch.randint(0, alphabet, (length - 1,), generator=g)])
            for _ in range(n_docs)]
    return torch.cat(docs + [torch.tensor([B])])


def test_tilt_is_a_normalised_softmax_with_the_closed_form_nll():
    hp = make_hp()
    model = random_model(hp).eval()
    V, T = hp.vocab_size, 12
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (1, T), generator=g).expand(V, T)
    hints = torch.randint(0, V, (1, T), generator=g)
    boosts = torch.tensor([[0.0, 0.5, 2.625, 6.0] * 3])
    every = torch.arange(V)[:, None].expand(V, T)  # row a scores token a at every position
    with torch.no_grad():
        tilted, untilted = model(ids, every, reduction="none", tilt=(hints.expand(V, T), boosts.expand(V, T))
                                 ).view(2, V, T)
        plain = model(ids, every, reduction="none").view(V, T)
    assert torch.equal(untilted, plain)  # the second half, the loss TTT trains on, is the plain NLL
    tilted, plain, cols = tilted.double(), plain.double(), torch.arange(T)
    assert torch.allclose(torch.exp(-tilted).sum(0), torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-6)
    y = torch.randint(0, V, (T,), generator=g)
    y[::3] = hints[0, ::3]  # some targets are the hint
    q = torch.exp(-plain[hints[0], cols])  # p(hint) before the tilt
    beta = boosts[0].double()
    closed = plain[y, cols] - beta * (y == hints[0]) + torch.log1p(q * (torch.exp(beta) - 1))
    assert torch.allclose(tilted[y, cols], closed, rtol=0, atol=1e-6)
    moved = tilted[y, cols] - plain[y, cols]  # down where the target is the hint, else up; boost 0: untouched
    assert torch.equal(moved < 0, (y == hints[0]) & (beta > 0)) and torch.equal(moved == 0, beta == 0)
    assert float(moved[(y == hints[0]) & (beta == 2.625)].max()) < -2.5


def test_matches_the_definition_on_hand_made_streams(tmp_path):
    # order 2: the context is one token.  After 5: 7, 8, 9, 8, 4 (positions 1, 3, 5, 7, 9)
    tokens = [3, 5, 7, 5, 8, 5, 9, 5, 8, 5, 4]
    for threshold, expected in ((0.5, {3: 7, 5: 7, 8: 5, 9: 8}), (0.8, {3: 7, 8: 5})):
        hints, boosts = hints_of(tokens, tmp_path, "stream", order=2, threshold=threshold)
        assert {p: int(hints[p]) for p in boosts.nonzero().flatten().tolist()} == expected
        assert set(boosts[boosts > 0].tolist()) == {2.625}
    # after 5: 6 four times, then 2 (position 8); position 10 sees 4 of 5 = 0.8: it passes 0.8, not 0.81
    tokens = [5, 6, 5, 6, 5, 6, 5, 6, 5, 2, 5, 6]
    for threshold in (0.8, 0.81):
        hints, boosts = hints_of(tokens, tmp_path, "stream", order=2, threshold=threshold)
        assert (int(hints[8]), float(boosts[8])) == (6, 2.625)
        assert (int(hints[10]), float(boosts[10])) == ((6, 2.625) if threshold == 0.8 else (0, 0.0))
    # doc scope: counts restart at each BOS and a context never reaches across one (order 3: positions 5, 6)
    tokens = [B, 5, 6, 5, 6, B, 5, 6, 5, 6, B]
    for scope, order, fired in (("doc", 2, [3, 4, 8, 9]), ("stream", 2, [3, 4, 5, 6, 8]), ("doc", 3, [4, 9]),
                                ("stream", 3, [4, 6, 8])):
        assert hints_of(tokens, tmp_path, scope, order=order)[1].nonzero().flatten().tolist() == fired, (scope, order)


@pytest.mark.parametrize("scope", ["doc", "stream"])
def test_matches_the_definition_on_random_streams(tmp_path, scope):
    fired = 0
    for seed in range(12):
        tokens = repetitive_stream(seed, n_docs=1 + seed % 4, length=20 + 7 * seed, alphabet=2 + seed % 3)
        for order, threshold in ((2, 0.0), (3, 0.5), (4, 0.8), (5, 1.0)):
            hints, boosts = hints_of(tokens, tmp_path, scope, order, threshold)
            want_hints, want_boosts = reference(tokens.tolist(), scope, order, threshold, 2.625)
            assert torch.equal(boosts, want_boosts.float()), (seed, order, threshold)
            assert torch.equal(hints, want_hints), (seed, order, threshold)
            fired += int((boosts > 0).sum())
    assert fired > 500


@pytest.mark.parametrize("scope", ["doc", "stream"])
def test_hints_read_only_the_prefix(tmp_path, scope):
    tokens = repetitive_stream(1)
    hints, boosts = hints_of(tokens, tmp_path, scope, order=4)
    assert int((boosts > 0).sum()) > 30
    g = torch.Generator().manual_seed(2)
    for p in range(0, len(tokens) - 1, 13):
        changed = tokens.clone()
        changed[p + 1:] = 2 + torch.randint(0, 4, (len(tokens) - p - 1,), generator=g)
        h, b = hints_of(changed, tmp_path, scope, order=4)
        assert torch.equal(h[:p + 1], hints[:p + 1]) and torch.equal(b[:p + 1], boosts[:p + 1]), p


def test_doc_scope_reads_only_its_own_document(tmp_path):
    """Documents 0 and 3 are the same text.  Rewriting every other document leaves a document's hints alone under
    scope doc; under scope stream rewriting document 0 moves document 3's (so the check can fail)."""
    tokens = repetitive_stream(3)
    starts = (tokens == B).nonzero().flatten().tolist()
    spans = list(zip(starts, starts[1:]))
    tokens[spans[3][0]:spans[3][1]] = tokens[spans[0][0]:spans[0][1]]
    g = torch.Generator().manual_seed(4)
    for scope in ("doc", "stream"):
        hints, boosts = hints_of(tokens, tmp_path, scope, order=4)
        for d, (b, e) in enumerate(spans):
            changed = tokens.clone()
            for b2, e2 in spans[:d] + spans[d + 1:]:
                changed[b2 + 1:e2] = 2 + torch.randint(0, 4, (e2 - b2 - 1,), generator=g)
            h, bo = hints_of(changed, tmp_path, scope, order=4)
            same = torch.equal(h[b:e], hints[b:e]) and torch.equal(bo[b:e], boosts[b:e])
            if scope == "doc" or d == 0:
                assert same, (scope, d)
            if scope == "stream" and d == 3:
                assert not same  # document 3's copy of document 0 was hinted from it


def repeated_document(length=300, copies=2, seed=0):
    """A random document (no repeated 15-token context inside it) `copies` times, each from its BOS, then a BOS."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.cat([torch.tensor([B]), torch.randint(2, 1024, (length - 1,), generator=g)])
    return torch.cat([doc] * copies + [torch.tensor([B])])


def tilted_tables(tokens, hp, tmp_path):
    return synthetic_tables()._replace(tilt=tg.ngram_tilt(tokens, hp, runtime(tmp_path)))


def test_sliding_eval_scores_once_and_the_tilt_lowers_the_loss_where_hints_fire(tmp_path):
    tokens = repeated_document()
    P = len(tokens) - 1
    results = {}
    for scope, boost in (("", 2.625), ("doc", 2.625), ("stream", 2.625), ("stream", 0.0)):
        hp = make_hp(NGRAM_TILT=scope)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tg, "NGRAM_BOOST", boost)
            tables = tilted_tables(tokens, hp, tmp_path) if scope else synthetic_tables()
            counts = count_scores(patch, P)
            results[scope, boost] = tg.eval_sliding(random_model(hp), tokens, hp, runtime(tmp_path), tables)
        assert torch.equal(counts, torch.ones(P, dtype=torch.int64)), (scope, boost)
    off = results["", 2.625]
    assert results["doc", 2.625] == off  # no context repeats inside the document: no hint, not a bit moved
    assert results["stream", 0.0] == off  # a zero boost adds nothing
    # the second copy's predictions after its first 14 are hinted right: each gains about 2.6 nats
    gated = tilted_tables(tokens, make_hp(NGRAM_TILT="stream"), tmp_path).tilt[1].gt(0).sum()
    assert int(gated) == 300 - 14
    assert off[0] - results["stream", 2.625][0] == pytest.approx(int(gated) / P * 2.61, rel=0.02)


def test_chunk_ttt_scores_once_with_the_tilt(tmp_path, monkeypatch):
    from test_ttt_legality import BATCH_SEQS
    monkeypatch.setattr(tg, "TTT_BATCH_SEQS", BATCH_SEQS)
    tokens = repeated_document(length=600, copies=3)
    P = len(tokens) - 1
    losses = []
    for scope in ("", "stream"):
        hp = make_hp(NGRAM_TILT=scope, TTT_CHUNK_TOKENS=512)
        tables = tilted_tables(tokens, hp, tmp_path) if scope else synthetic_tables()
        with monkeypatch.context() as patch:
            counts = count_scores(patch, P)
            loss, bpb, adapted, n_chunks = tg.eval_ttt(random_model(hp), tokens, hp, runtime(tmp_path),
                                                       tables, time.perf_counter())
        assert torch.equal(counts, torch.ones(P, dtype=torch.int64)) and (adapted, n_chunks) == (3, 4)
        losses.append(loss)
    assert losses[1] < losses[0] - 1.0  # two thirds of the predictions are hinted right


def test_phased_ttt_scores_once_with_the_tilt(tmp_path, monkeypatch):
    from test_ttt_phased import CONSTANTS, PHASED, documents
    for name, value in CONSTANTS.items():
        monkeypatch.setattr(tg, name, value)
    tokens, _ = documents()
    tokens = torch.cat([tokens[:-1], tokens])  # every document twice: the second copies are hinted (scope stream)
    P = len(tokens) - 1
    losses = {}
    for scope in ("", "doc", "stream"):  # stream: its hints (a phased run refuses that scope) on a doc-scope run
        hp = make_hp(**PHASED, NGRAM_TILT=scope and "doc")
        tables = tilted_tables(tokens, make_hp(NGRAM_TILT=scope), tmp_path) if scope else synthetic_tables()
        with monkeypatch.context() as patch:
            counts = count_scores(patch, P)
            losses[scope], _, adapted, n = tg.eval_ttt(random_model(hp), tokens, hp, runtime(tmp_path),
                                                        tables, time.perf_counter())
        assert torch.equal(counts, torch.ones(P, dtype=torch.int64)) and adapted == n == 14, scope
    assert losses["doc"] == pytest.approx(losses[""], rel=1e-6)  # random documents: nothing repeats inside one
    assert losses["stream"] < losses[""] - 0.5


def test_settings_are_checked():
    for env, message in (({"NGRAM_TILT": "ngram"}, "NGRAM_TILT must be one of ('', 'doc', 'stream'), got 'ngram'"),
                         ({"NGRAM_ORDER": "8"}, "unknown setting NGRAM_ORDER='8'"),  # a constant now
                         ({"NGRAM_TILT_ENABLED": "1"}, "unknown setting NGRAM_TILT_ENABLED='1'")):  # #2135's name
        with pytest.raises(tg.ConfigError, match=re.escape(message)):
            make_hp(**env)
    assert tg.ngram_tilt(torch.tensor([B, 5, 6]), make_hp(), None) is None  # off by default
    with pytest.raises(tg.ConfigError, match="NGRAM_TILT=stream with TTT_MODE=phased: .* use NGRAM_TILT=doc"):
        make_hp(NGRAM_TILT="stream", TTT_MODE="phased")


@pytest.mark.slow  # builds the sp8192 shards and trains: ~2.5 min on a loaded 2-core box
def test_corpus_measurement(tiny_data_8192, tmp_path):
    """A tiny sp8192 model trained 30 steps, sliding eval over the first validation documents of the shared corpus
    (technical documentation, far more repetitive than FineWeb) with the tilt off, scope doc and scope stream."""
    env = dict(TINY_ENV, DATA_PATH=str(tiny_data_8192), TOKENIZER_PATH=str(TOKENIZER_8192), VOCAB_SIZE="8192",
               ITERATIONS="30", VAL_MAX_TOKENS="32768", EVAL_STRIDE="128")  # README's figures: all of it, stride 64
    hp = tg.Hyperparameters.from_env(env)
    rt = runtime(tmp_path)
    val = tg.load_val_tokens(hp)
    tables = tg.build_byte_tables(tg.load_tokenizer(hp), hp.vocab_size)
    torch.manual_seed(0)
    model = tg.GPT(hp)
    tg.train(model, hp, rt)
    tg.LateQAT.enabled = False
    report = {"": tg.eval_sliding(model, val, hp, rt, tables)[1]}
    for scope in ("doc", "stream"):
        hp_scope = tg.Hyperparameters.from_env(dict(env, NGRAM_TILT=scope))
        t0 = time.perf_counter()
        tilt = tg.ngram_tilt(val, hp_scope, rt)
        build = time.perf_counter() - t0
        gated = float((tilt[1] > 0).float().mean())
        bpb = tg.eval_sliding(model, val, hp_scope, rt, tables._replace(tilt=tilt))[1]
        report[scope] = bpb
        print(f"ngram corpus: scope:{scope} tokens:{len(val)} docs:{int((val == B).sum())} gated:{gated:.4f} "
              f"build:{build:.2f}s bpb:{bpb:.4f} (off {report['']:.4f})")
        assert math.isfinite(bpb) and 0.005 < gated < 0.5
    assert report["stream"] < report[""] and report["doc"] < report[""]
    assert np.isfinite(report[""])


def test_the_tilt_never_enters_a_ttt_training_loss(tmp_path):
    """Phased TTT with NGRAM_TILT: the scores move, the adapters trained on the same documents do not (#2135 trains
    on the untilted loss and tilts only the scored NLL)."""
    from test_ttt_phased import PHASED, documents
    tokens, _ = documents()
    tokens = torch.cat([tokens[:-1], tokens])  # every document twice: the second copies are hinted (scope stream)
    hp = make_hp(**PHASED, NGRAM_TILT="doc")
    docs = tg.split_documents(tokens)[-4:]
    results = {}
    for tilted in (False, True):
        model = random_model(hp)
        for p in model.parameters():  # as phased TTT does: gradients reach the adapters alone
            p.requires_grad_(False)
        lora = tg.LoRA(model, len(docs), 0)
        model.lora = lora
        tables = tilted_tables(tokens, make_hp(NGRAM_TILT="stream"), tmp_path) if tilted else synthetic_tables()
        totals = tg.score_doc_batch(model, lora, tokens, docs, hp, runtime(tmp_path), tables)
        results[tilted] = totals, [b.detach().clone() for b in lora.B]
    assert results[True][0][0] < results[False][0][0] - 1.0  # hinted: the scored NLL fell
    assert all(torch.equal(a, b) for a, b in zip(results[False][1], results[True][1]))  # trained identically
