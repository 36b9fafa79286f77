"""What a multi-rank run must do that one process cannot show: every rank compiles its graphs before the eval clock,
and every rank stops training at the same step whatever its own clock says.  gloo ranks under torchrun, on CPU."""
import json

import pytest

from conftest import REPO, run_script

# Phased TTT as the eval runs it, compiled (dynamo's eager backend: the graphs, without inductor's code generation)
# with the FA3 stand-in registered as custom ops, as tests/test_attention.py does.  Each rank writes the number of
# graphs compiled after the warm-up and after the timed eval, and what the first and later segments cost.
WARM_WORKER = '''
import functools, json, time, torch
import train_gpt_human as tg
from test_attention import fake_causal, traced_varlen

hp = tg.Hyperparameters.from_env()
torch.set_num_threads(1)
rt = tg.setup_runtime(hp)
tg.FLASH["fa3"] = (fake_causal, lambda q, k, v, cu_seqlens_q, **_: traced_varlen(q, k, v, cu_seqlens_q))
tg.ATTENTION["kernel"] = "fa3"
tg.TTT_PREFIX_DOCS, tg.TTT_PAUSE_RANKS, tg.TTT_BATCH_SEQS = 12, 1, 4
torch.manual_seed(0)
model = tg.GPT(hp)
ttt_model = torch.compile(model, dynamic=True, backend="eager")
g = torch.Generator().manual_seed(1)
tables = tg.ByteTables(torch.ones(1024, dtype=torch.long), torch.zeros(1024, dtype=torch.bool),
                       torch.zeros(1024, dtype=torch.bool))
graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
prior = tg.warm_up_ttt(ttt_model, hp, rt, tables)
warmed = graphs()
rates, plain_batch = [], tg.score_doc_batch


def timed_batch(model, lora, tokens, docs, hp, *args):  # seconds per row-token of each timed batch, in order
    t0 = time.perf_counter()
    out = plain_batch(model, lora, tokens, docs, hp, *args)
    rates.append((time.perf_counter() - t0) / tg.doc_batch_cost(docs, hp))
    return out


tg.score_doc_batch = timed_batch
parts = [torch.cat([torch.tensor([tg.BOS_ID]), torch.randint(2, 1024, (n - 1,), generator=g)])
         for n in torch.randint(10, 400, (40,), generator=g).tolist()]
tokens = torch.cat(parts + [torch.tensor([tg.BOS_ID])])
result = tg.eval_ttt(ttt_model, tokens, hp, rt, tables, time.perf_counter(), prior)
json.dump({"warmed": warmed, "after": graphs(), "adapted": result[2], "batches": result[3], "rates": rates},
          open(f"rank{rt.rank}.json", "w"))
'''

TINY_RECORD = dict(PRESET="record", NUM_LAYERS="4", LOOP_START="1", LOOP_END="2", PARALLEL_START="3",
                   MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", VOCAB_SIZE="1024", TRAIN_SEQ_LEN="128",
                   EVAL_SEQ_LEN="128", EVAL_BATCH_SEQS="4", TTT_DOC_BATCH="4", TTT_STEP_TOKENS="256",
                   TTT_SHORT_CHUNKS="64:8", TTT_CHUNK_TOKENS="512", DEVICE="cpu", RUN_ID="ranks")


@pytest.mark.parametrize("nproc", [2, 3])
def test_every_rank_compiles_its_ttt_graphs_before_the_eval_clock(tiny_env, tmp_path, nproc):
    """Per rank: the graphs after TTT's warm-up are all the timed eval uses (many-row, split-row and one-row adapter
    steps, short chunks, the global phase, the no-grad tail): 0 compiled on the clock, on every rank."""
    env = dict(tiny_env, **TINY_RECORD, PYTHONPATH=f"{tiny_env['PYTHONPATH']}:{REPO / 'tests'}")
    worker = tmp_path / "worker.py"
    worker.write_text(WARM_WORKER)
    rc, out = run_script(worker, env, tmp_path, nproc=nproc, timeout=400)
    assert rc == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert [r["after"] - r["warmed"] for r in ranks] == [0] * nproc, ranks
    assert all(r["warmed"] >= 4 for r in ranks)  # the graphs exist: adapter steps, global phase, no-grad tail
    assert ranks[0]["adapted"] == ranks[0]["batches"] == 10  # 40 documents in batches of 4, all adapted
    # each rank's first timed batch costs per row-token what its later ones cost (a compile would make it many
    # times dearer; 3x leaves room for a shared 2-core machine's noise)
    for r in ranks:
        later = sorted(r["rates"][1:])
        assert later and r["rates"][0] < 3 * later[len(later) // 2], r["rates"]


# train() on every rank with its own clock running at its own speed: rank 0's clock, shared every CLOCK_EVERY
# steps, decides the stop, so every rank stops at the same step, a few steps before the cap.
CLOCK_WORKER = '''
import json, torch
import train_gpt_human as tg

hp = tg.Hyperparameters.from_env()
torch.set_num_threads(1)
rt = tg.setup_runtime(hp)
ticks = [0.0]


def skewed_clock():  # 1 s (rank 0) or 3.7 s (rank 1) per call, whatever the real time
    ticks[0] += 1.0 if rt.rank == 0 else 3.7
    return ticks[0]


tg.time.perf_counter = skewed_clock
steps = []
plain_step = tg.train_step
tg.train_step = lambda *a: steps.append(1) or plain_step(*a)
tg.train(tg.GPT(hp), hp, rt)
json.dump({"steps": len(steps)}, open(f"rank{rt.rank}.json", "w"))
'''


def test_every_rank_stops_at_the_same_step_with_skewed_clocks(tiny_env, tmp_path):
    env = dict(tiny_env, ITERATIONS="500", MAX_WALLCLOCK_SECONDS="6", GPTQ_RESERVE_MS="0", WARMUP_STEPS="0",
               TRAIN_LOG_EVERY="1000", WARMDOWN_ITERS="0")
    worker = tmp_path / "worker.py"
    worker.write_text(CLOCK_WORKER)
    rc, out = run_script(worker, env, tmp_path, nproc=2, timeout=300)
    assert rc == 0, out[-3000:]
    steps = [json.loads((tmp_path / f"rank{r}.json").read_text())["steps"] for r in range(2)]
    assert steps[0] == steps[1] and 10 < steps[0] < 500, steps
    stop = [line for line in out.splitlines() if "stopping_early" in line]
    assert len(stop) == 1 and f"last_step:{steps[0]}/500" in stop[0], stop


def test_every_rank_compiles_the_seeds_chunk_ttt_before_the_eval_clock(tiny_env, tmp_path):
    """The seed's chunk TTT (LaCT) on 2 ranks: scoring windows and the padded per-rank training step are compiled
    by the warm-up on every rank; the timed eval over 40 documents compiles nothing more."""
    env = dict(tiny_env, PRESET="seed", EVAL_BATCH_SEQS="4", TTT_CHUNK_TOKENS="512", DEVICE="cpu", RUN_ID="ranks",
               PYTHONPATH=f"{tiny_env['PYTHONPATH']}:{REPO / 'tests'}")
    worker = tmp_path / "worker.py"
    worker.write_text(WARM_WORKER)
    rc, out = run_script(worker, env, tmp_path, nproc=2, timeout=400)
    assert rc == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["after"] - r["warmed"] for r in ranks] == [0, 0] and all(r["warmed"] >= 2 for r in ranks), ranks
    assert ranks[0]["adapted"] == ranks[0]["batches"] - 1 > 0  # every chunk but the last adapted
