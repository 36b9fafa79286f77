"""Legality of score-first test-time training (eval_ttt): what the product guarantees a grader.

- a prediction is scored before any update that used its target, so changing later tokens never changes an
  earlier score (bit for bit), and adaptation really feeds forward into later chunks;
- every prediction is scored exactly once, on one rank or on two (gloo);
- the last chunk never reaches a backward pass, and each adapted chunk is trained on exactly its own targets;
- the eval phase reads the artifact and the validation tokens only, never a training shard.

Prediction i reads tokens[..i] and is scored against tokens[i + 1]; it belongs to chunk i // TTT_CHUNK_TOKENS.
These tests use a seeded random-init tiny model, synthetic tokens and synthetic byte tables, so they need
neither ../shared nor a trained model.  Scores are observed by test-side instrumentation (a wrapper around
tg.score_windows plus a forward hook), not by product hooks.
"""
import builtins
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fineweb
import train_gpt_human as tg
from conftest import TINY_ENV, count_scores

C = 512  # TTT_CHUNK_TOKENS for these tests
N_CHUNKS = 4
P = N_CHUNKS * C  # predictions; the token stream has P + 1 tokens
VOCAB = 1024
RANGE = VOCAB // N_CHUNKS  # targets of chunk c use ids [c * RANGE, (c + 1) * RANGE): an id names its chunk
BATCH_SEQS = 2  # tg.TTT_BATCH_SEQS for these tests


pytestmark = pytest.mark.usefixtures("one_thread")


def make_env(**overrides):
    env = dict(TINY_ENV, TTT_CHUNK_TOKENS=str(C), EVAL_SEQ_LEN="128", EVAL_STRIDE="64", TTT_EPOCHS="2",
               EVAL_BUDGET_SECONDS="100000", DATA_PATH="/nonexistent", TOKENIZER_PATH="/nonexistent")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def make_hp(**overrides):
    return tg.Hyperparameters.from_env(make_env(**overrides))


def synthetic_tables(vocab=VOCAB):
    """Byte tables like build_byte_tables': 1-4 bytes per token, some space-marked, two boundary ids."""
    ids = torch.arange(vocab)
    base = 1 + ids % 4
    space = ids % 3 == 0
    boundary = ids < 2
    base[boundary] = 0
    return tg.ByteTables(base.long(), space, boundary)


def chunked_tokens(seed):
    """P + 1 tokens; token t >= 1 (the target of prediction t - 1) is drawn from its chunk's id range."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(P + 1, dtype=torch.long)
    tokens[0] = torch.randint(0, RANGE, (1,), generator=g)
    for c in range(N_CHUNKS):
        tokens[c * C + 1:(c + 1) * C + 1] = torch.randint(c * RANGE, (c + 1) * RANGE, (C,), generator=g)
    return tokens


def random_model(hp, seed=0):
    torch.manual_seed(seed)
    model = tg.GPT(hp)
    if hp.attn_out_init == "zero":  # the record's zero attention outputs would hide every attention effect
        with torch.no_grad():
            model.qo[hp.num_layers:].normal_(std=0.05)
    return model


def runtime(tmp_path, rank=0, world_size=1):
    return tg.Runtime(rank, world_size, torch.device("cpu"), str(tmp_path / "log.txt"))


class Recorder:
    """Records, from outside the product: the per-prediction NLL that score_windows summed (and how often each
    prediction was scored), the order of scoring calls and gradient-enabled forwards, and what the latter saw."""

    def __init__(self, monkeypatch, model, n_predictions):
        self.scores = torch.full((n_predictions,), float("nan"), dtype=torch.float64)
        self.times_scored = torch.zeros(n_predictions, dtype=torch.int64)
        self.events = []  # ("score", first_prediction, last_prediction + 1) | ("train", input ids, target ids)
        rows = []
        original = tg.score_windows

        def hook(module, args, kwargs, output):
            ids, targets = args[0], args[1]
            if torch.is_grad_enabled():
                self.events.append(("train", ids.detach().clone(), targets.detach().clone()))
            else:
                rows.append((ids.clone(), output.detach().view(ids.shape).double().clone()))

        self.handle = model.register_forward_hook(hook, with_kwargs=True)

        def score_windows(model_, tokens, windows, hp, rt, tables):
            rows.clear()
            totals = original(model_, tokens, windows, hp, rt, tables)
            # every forward has EVAL_BATCH_SEQS rows (one fixed shape); rows past the last window are padding
            B = hp.eval_batch_seqs
            assert len(rows) == -(-len(windows) // B) and all(ids.size(0) == B for ids, _ in rows)
            flat = [(ids[r], nll[r]) for ids, nll in rows for r in range(B)][:len(windows)]
            scored_sum = 0.0
            for (start, length, score_from), (ids, nll) in zip(windows, flat):
                assert torch.equal(ids[:length], tokens[start:start + length]), "row reads the window's own tokens"
                preds = slice(start + score_from, start + length)
                self.scores[preds] = nll[score_from:length]
                self.times_scored[preds] += 1
                scored_sum += float(nll[score_from:length].sum())
            # the instrumentation sees exactly what the product summed
            assert scored_sum == pytest.approx(float(totals[0]), rel=1e-12, abs=1e-9)
            if windows:
                self.events.append(("score", min(s + f for s, _, f in windows), max(s + n for s, n, _ in windows)))
            return totals

        monkeypatch.setattr(tg, "score_windows", score_windows)

    def close(self):
        self.handle.remove()


def run_ttt(monkeypatch, tmp_path, tokens, env_overrides, seed=0, batch_seqs=BATCH_SEQS):
    """eval_ttt on a fresh seeded model, TTT_BATCH_SEQS = batch_seqs; returns (result, Recorder, counts, hp),
    counts: how often each prediction was scored."""
    hp = make_hp(**env_overrides)
    model = random_model(hp, seed)
    with monkeypatch.context() as patch:
        patch.setattr(tg, "TTT_BATCH_SEQS", batch_seqs)
        rec = Recorder(patch, model, len(tokens) - 1)
        counts = count_scores(patch, len(tokens) - 1)
        try:
            result = tg.eval_ttt(model, tokens, hp, runtime(tmp_path), synthetic_tables(),
                                 time.perf_counter())
        finally:
            rec.close()
    return result, rec, counts, hp


CONFIGS = {
    "fixed": {},
    "entropy": dict(TTT_ENTROPY_ADAPT=1),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_scores_never_depend_on_later_tokens(monkeypatch, tmp_path, config):
    overrides = CONFIGS[config]
    tokens = chunked_tokens(seed=1)
    (loss, bpb, adapted, n_chunks), base, counts, _ = run_ttt(monkeypatch, tmp_path, tokens, overrides)
    assert (n_chunks, adapted) == (N_CHUNKS, N_CHUNKS - 1)
    assert torch.equal(counts, torch.ones(P, dtype=torch.int64))
    assert torch.equal(base.times_scored, torch.ones(P, dtype=torch.int64))
    assert loss == pytest.approx(float(base.scores.mean()), rel=1e-12)
    g = torch.Generator().manual_seed(99)
    # Changing token j may move prediction i only if i >= j - 1 (j is its target or context) or i lies in a
    # later chunk than j's target (through the adapted weights).  So every prediction i < j - 1 in chunk(j) or
    # before must keep its score bit for bit; in particular all of chunks < chunk(j).
    for k in range(N_CHUNKS - 1):
        # (a) replace every token from j on, j = the 101st target of chunk k + 1: all of chunks <= k and the
        # first 100 predictions of chunk k + 1 must be bit-identical
        j = (k + 1) * C + 1 + 100
        changed = tokens.clone()
        changed[j:] = torch.randint(0, VOCAB, (P + 1 - j,), generator=g)
        _, rec, _, _ = run_ttt(monkeypatch, tmp_path, changed, overrides)
        assert torch.equal(rec.scores[:j - 1], base.scores[:j - 1]), f"a score before prediction {j - 1} moved"
        assert not torch.equal(rec.scores[j - 1:], base.scores[j - 1:])
    for k in range(1, N_CHUNKS):
        # (b) change one target inside chunk k: no score in chunks < k, nor earlier in chunk k, may move ...
        t = k * C + 1 + 37
        changed = tokens.clone()
        changed[t] = (tokens[t] + 1) % VOCAB
        _, rec, _, _ = run_ttt(monkeypatch, tmp_path, changed, overrides)
        assert torch.equal(rec.scores[:t - 1], base.scores[:t - 1]), f"a score before prediction {t - 1} moved"
        assert rec.scores[t - 1] != base.scores[t - 1]  # the prediction whose target changed
        if k < N_CHUNKS - 1:
            # ... while a later chunk's prediction whose window cannot see token t (it lies > EVAL_SEQ_LEN back)
            # moves: the change reached it through the adapted weights only, so adaptation is real and forward
            far = (k + 1) * C + C // 2
            assert far - t > 128
            assert rec.scores[far] != base.scores[far]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_last_chunk_never_trained_and_each_chunk_trained_after_scoring(monkeypatch, tmp_path, config):
    tokens = chunked_tokens(seed=2)
    (_, _, adapted, _), rec, _, hp = run_ttt(monkeypatch, tmp_path, tokens, CONFIGS[config])
    trained_targets = torch.zeros(VOCAB, dtype=torch.int64)
    scored_chunks = 0
    n_train = 0
    for event in rec.events:
        if event[0] == "score":
            _, first, stop = event
            assert (first, stop) == (scored_chunks * C, min((scored_chunks + 1) * C, P)), "chunks scored in order"
            scored_chunks += 1
            continue
        _, ids, targets = event
        n_train += 1
        target_chunks = set((targets // RANGE).unique().tolist())
        # score first: every target in a backward pass belongs to a chunk that has already been scored
        assert max(target_chunks) < scored_chunks
        assert max(target_chunks) < N_CHUNKS - 1, "last chunk's tokens reached a backward pass"
        assert int(ids.max()) < (N_CHUNKS - 1) * RANGE, "last chunk's tokens were a training input"
        trained_targets += torch.bincount(targets.reshape(-1), minlength=VOCAB)
    assert scored_chunks == N_CHUNKS and adapted == N_CHUNKS - 1 and n_train > 0
    for c in range(N_CHUNKS):
        ids = slice(c * RANGE, (c + 1) * RANGE)
        expected = torch.bincount(tokens[c * C + 1:(c + 1) * C + 1], minlength=VOCAB)[ids]
        epochs = 0 if c == N_CHUNKS - 1 else tg.chunk_epochs(hp, float(rec.scores[c * C:(c + 1) * C].mean()))
        # adaptation on chunk c trains on exactly chunk c's targets, once per epoch
        assert torch.equal(trained_targets[ids], epochs * expected), f"chunk {c}: epochs {epochs}"
    if hp.ttt_entropy_adapt:  # a random-init model is far above TTT_ENTROPY_BOUNDS: the hardest setting
        assert tg.chunk_epochs(hp, float(rec.scores[:C].mean())) == 4


def _rank_worker(rank, world_size, payload_path, out_dir):
    """One gloo rank: eval_ttt for every config in the payload; saves [(result, counts)] for this rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world_size)
    try:
        payload = torch.load(payload_path)
        rt = tg.Runtime(rank, world_size, torch.device("cpu"), os.path.join(out_dir, "log.txt"))
        results = []
        for overrides in payload["configs"]:
            hp = tg.Hyperparameters.from_env({**payload["env"], **overrides})
            model = tg.GPT(hp)
            model.load_state_dict(payload["state"])
            with pytest.MonkeyPatch.context() as patch:
                for name, value in payload["constants"].items():
                    patch.setattr(tg, name, value)
                counts = count_scores(patch, len(payload["tokens"]) - 1)
                tables = tg.ByteTables(*payload["tables"])  # saved as a plain tuple: weights_only loading
                result = tg.eval_ttt(model, payload["tokens"], hp, rt, tables, time.perf_counter())
            results.append((result, counts))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still uses it (SIGABRT on a loaded machine)
    finally:
        dist.destroy_process_group()


def run_ranks(out_dir, env, state, tokens, tables, configs, world_size=2, constants=None):
    """Runs eval_ttt under `world_size` gloo processes, with the module constants `constants` set in each
    (default TTT_BATCH_SEQS = BATCH_SEQS); returns per config [(result per rank, summed counts)]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = out_dir / "payload.pt"
    constants = {"TTT_BATCH_SEQS": BATCH_SEQS} if constants is None else constants
    torch.save({"env": env, "state": state, "tokens": tokens, "tables": tuple(tables), "constants": constants,
                "configs": [{k: str(v) for k, v in c.items()} for c in configs]}, payload)
    mp.spawn(_rank_worker, args=(world_size, str(payload), str(out_dir)), nprocs=world_size, join=True)
    per_rank = [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]
    return [([per_rank[r][i][0] for r in range(world_size)], sum(per_rank[r][i][1] for r in range(world_size)))
            for i in range(len(configs))]


# 1799 predictions in chunks of 448 (= 3.5 x EVAL_SEQ_LEN): five chunks, the last of 7 predictions; every
# adapted chunk ends in a ragged 64-token sequence, and with 3 sequences per TTT batch (RAGGED_BATCH_SEQS)
# rank 1 sometimes has none.
RAGGED, RAGGED_BATCH_SEQS = dict(TTT_CHUNK_TOKENS=448), 3


@pytest.mark.slow  # two spawned gloo processes: ~20 s on a loaded 2-core box
def test_every_prediction_scored_once_on_two_ranks(tmp_path):
    tokens = chunked_tokens(seed=3)[:1800]
    hp = make_hp()
    state = random_model(hp).state_dict()
    configs = [RAGGED, dict(RAGGED, TTT_ENTROPY_ADAPT=1)]
    results = run_ranks(tmp_path / "ranks", make_env(), state, tokens, synthetic_tables(), configs,
                        constants={"TTT_BATCH_SEQS": RAGGED_BATCH_SEQS})
    for (per_rank, counts), config in zip(results, configs):
        assert torch.equal(counts, torch.ones(len(tokens) - 1, dtype=torch.int64)), config
        assert per_rank[0] == per_rank[1]  # both ranks report the same all-reduced result
        assert per_rank[0][2:] == (4, 5)


def test_every_prediction_scored_once_on_one_rank(monkeypatch, tmp_path):
    tokens = chunked_tokens(seed=4)[:1800]
    (_, _, adapted, n_chunks), rec, counts, _ = run_ttt(monkeypatch, tmp_path, tokens, RAGGED,
                                                        batch_seqs=RAGGED_BATCH_SEQS)
    assert (adapted, n_chunks) == (4, 5)
    assert torch.equal(counts, torch.ones(len(tokens) - 1, dtype=torch.int64))
    assert torch.equal(rec.times_scored, counts)  # identity: the instrumented rows agree with `counts`
    assert not torch.isnan(rec.scores).any()


def test_chunk_windows_tile_every_prediction_once():
    """make_windows per chunk (as eval_ttt calls it) covers [0, P) exactly once, never reads past the chunk's
    last target, and gives each scored prediction at least min(i, EVAL_SEQ_LEN - EVAL_STRIDE) context."""
    for seq_len, stride in [(128, 64), (128, 128), (128, 1), (128, 48), (100, 64)]:
        for P_, C_ in [(1799, 448), (2048, 512), (300, 1000), (1000, 37), (1, 512)]:
            counts = torch.zeros(P_, dtype=torch.int64)
            for begin in range(0, P_, C_):
                end = min(begin + C_, P_)
                for start, length, score_from in tg.make_windows(begin, end, seq_len, stride):
                    assert 0 <= score_from < length <= seq_len and start >= 0
                    assert start + length <= end  # reads tokens[start .. start + length] only: this chunk's targets
                    assert start + score_from >= begin
                    first = start + score_from
                    assert first - start >= min(first, seq_len - stride)
                    counts[first:start + length] += 1
            assert torch.equal(counts, torch.ones_like(counts)), (seq_len, stride, P_, C_)
    # a stride longer than the window would leave predictions between windows unscored: refused up front
    with pytest.raises(tg.ConfigError, match="EVAL_STRIDE=256 must be <= EVAL_SEQ_LEN=128"):
        make_hp(EVAL_STRIDE=256)


def identity_hessians(hp):
    d, hidden = hp.model_dim, int(hp.mlp_mult * hp.model_dim)
    out = {}
    for i in range(hp.num_layers):
        out.update({f"attn_in.{i}": torch.eye(d), f"attn_out.{i}": torch.eye(d), f"mlp_in.{i}": torch.eye(d),
                    f"mlp_hidden.{i}": torch.eye(hidden)})
    return out


def test_eval_phase_reads_no_training_data(monkeypatch, tmp_path):
    val_dir = tmp_path / "val_only"
    tokens = chunked_tokens(seed=5)
    fineweb.write_shard(val_dir / fineweb.shard_name("val", 0), tokens.numpy().astype(np.uint16))
    hp = tg.Hyperparameters.from_env(make_env(DATA_PATH=val_dir))
    rt = runtime(tmp_path)
    tables = synthetic_tables()
    blob = tg.quantize_model(random_model(hp), identity_hessians(hp), hp, rt, code_bytes=0)
    artifact = tmp_path / "model.ptz"
    artifact.write_bytes(blob)

    opened = []
    real_open, real_fromfile, real_shard_files = builtins.open, np.fromfile, tg.shard_files

    def record_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def record_fromfile(file, *args, **kwargs):
        opened.append(str(file))
        return real_fromfile(file, *args, **kwargs)

    def guarded_shard_files(data_path, split):
        if split != "val":
            raise AssertionError(f"eval asked for {split} shards")
        return real_shard_files(data_path, split)

    def forbidden(*args, **kwargs):
        raise AssertionError("eval touched training data")

    monkeypatch.setattr(builtins, "open", record_open)
    monkeypatch.setattr(np, "fromfile", record_fromfile)
    monkeypatch.setattr(tg, "shard_files", guarded_shard_files)
    for name in ("TokenStream", "DistributedTokenLoader", "collect_hessians", "train"):
        monkeypatch.setattr(tg, name, forbidden)
    val = tg.load_val_tokens(hp)  # what main() hands the eval phase
    tg.run_eval_phase(str(artifact), val, hp, rt, tables)
    monkeypatch.undo()

    assert torch.equal(val, tokens)
    assert not [f for f in opened if "train" in os.path.basename(f)]
    assert str(artifact) in opened
    log = (tmp_path / "log.txt").read_text()
    line = next(x for x in log.splitlines() if x.startswith("final_int6_ttt_exact "))
    assert f"chunks_adapted:{N_CHUNKS - 1}/{N_CHUNKS}" in line
    fields = dict(f.split(":", 1) for f in line.split()[1:])
    assert np.isfinite(float(fields["val_bpb"])) and float(fields["val_loss"]) > 0
