"""The training step's overheads (issue #19), each against the plain path on CPU: the bf16 residual stream, Parallel
Muon's bf16 communication and the compiled Newton-Schulz."""
import os

import pytest
import torch

import train_gpt_human as tg
from conftest import REPO, run_script
from test_core import noisy_model  # every parameter perturbed: zero-initialised branches matter


def small_hp(**overrides):
    """The record's model class (loops, parallel lanes, gated smear, attention gate, U-Net skips) at toy size."""
    values = dict(tg.PRESETS["record"], num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=512,
                  train_seq_len=64, eval_seq_len=64, loop_start=1, loop_end=2, parallel_start=2, device="cpu",
                  compile=0)
    values.update(overrides)
    hp = tg.Hyperparameters(**values)
    hp.validate()
    return hp


def batch(hp, rows=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, hp.vocab_size, (rows, hp.train_seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


# ----------------------------------------------------------------------------------------------------
# 1. The bf16 residual stream under autocast (always: the references')
# ----------------------------------------------------------------------------------------------------


def stream_dtypes(model, x, y, monkeypatch):
    """Runs the model under CPU bf16 autocast; returns the loss and the dtypes of every block's residual output."""
    seen = []
    plain, lanes = tg.Block.forward, tg.Block.forward_lanes

    def forward(self, *args, **kwargs):
        out = plain(self, *args, **kwargs)
        seen.append(out.dtype)
        return out

    def forward_lanes(self, *args, **kwargs):
        out = lanes(self, *args, **kwargs)
        seen.extend(t.dtype for t in out)
        return out

    monkeypatch.setattr(tg.Block, "forward", forward)
    monkeypatch.setattr(tg.Block, "forward_lanes", forward_lanes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, y)
    monkeypatch.undo()
    return loss, seen


def test_bf16_stream_keeps_the_residual_in_bf16_and_the_loss(monkeypatch):
    hp = small_hp()
    model = noisy_model(hp)
    x, y = batch(hp)
    fp32_loss = model(x, y)
    loss, dtypes = stream_dtypes(model, x, y, monkeypatch)
    # 8 virtual layers (4 + 2 loops of layers 1..2), layers 2 and 3 on two lanes: 4 single outputs + 2 x 4 lanes
    assert len(dtypes) == 12 and set(dtypes) == {torch.bfloat16}
    assert loss.dtype == torch.float32  # the softcap and cross-entropy stay fp32
    assert abs(loss.item() - fp32_loss.item()) <= 5e-3 * fp32_loss.item()  # measured 7e-4 (fp32 stream: 1.5e-4)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------------
# 2. Parallel Muon's communication in bf16, 2 gloo ranks against 1
# ----------------------------------------------------------------------------------------------------

# Each rank steps its own gradients through Optimizers (Parallel Muon, as in training) with bf16 and with fp32
# communication; rank 0 also steps the rank-averaged gradients on one rank.  Every tensor handed to a collective
# is recorded.
MUON_WORKER = '''
import torch, torch.distributed as dist
import train_gpt_human as tg

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
sent = []


def recording(collective):
    def call(out, inp, *args, **kwargs):
        sent.append((collective.__name__, out.dtype, inp.dtype))
        return collective(out, inp, *args, **kwargs)
    return call


dist.reduce_scatter_tensor = recording(dist.reduce_scatter_tensor)
dist.all_gather_into_tensor = recording(dist.all_gather_into_tensor)
SHAPES = [(3, 48, 32), (4, 32, 32), (40, 24)]  # 3 matrices pad to 4 over 2 ranks; a 2-D matrix is a bank of one


def fresh():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in SHAPES]


def grads(step, r):
    torch.manual_seed(100 * step + r)
    return [torch.randn(*s) for s in SHAPES]


out = {"init": [p.detach().clone() for p in fresh()]}
for name, dtype, ranks in (("bf16", torch.bfloat16, world), ("fp32", torch.float32, world), ("one", None, 1)):
    if ranks == 1 and rank:
        continue
    params = fresh()
    muon = tg.Muon(params, 0.02, 0.95, 0.04, ranks, "eqr", dtype or torch.float32)
    opt = tg.Optimizers(muon, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0), 0.0, ranks)
    sent.clear()
    for step in range(3):
        for p, *gs in zip(params, *(grads(step, r) for r in range(world))):
            p.grad = gs[rank] if ranks > 1 else sum(gs) / world
        opt.step()
    out[name] = {"params": [p.detach().clone() for p in params], "sent": list(sent),
                 "buffers": [b.dtype for b in muon.buffers]}
torch.save(out, f"rank{rank}.pt")
dist.destroy_process_group()
'''


def test_two_ranks_communicate_in_bf16_and_match_one_rank(tmp_path):
    worker = tmp_path / "muon_worker.py"
    worker.write_text(MUON_WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    rc, out = run_script(worker, env, tmp_path, nproc=2, timeout=300)
    assert rc == 0, out[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        # per step: one reduce-scatter and one all-gather per matrix, both sides in the communication dtype
        assert sorted(r0[name]["sent"]) == sorted(
            [("reduce_scatter_tensor", dtype, dtype)] * 9 + [("all_gather_into_tensor", dtype, dtype)] * 9)
        assert r0[name]["buffers"] == [torch.float32] * 3  # momentum stays fp32
        for a, b in zip(r0[name]["params"], r1[name]["params"]):
            assert a.dtype == torch.float32 and torch.equal(a, b)  # every rank holds the same weights
    moved = max(float((p - q).abs().max()) for p, q in zip(r0["one"]["params"], r0["init"]))
    fp32 = max(float((p - q).abs().max()) for p, q in zip(r0["fp32"]["params"], r0["one"]["params"]))
    bf16 = max(float((p - q).abs().max()) for p, q in zip(r0["bf16"]["params"], r0["one"]["params"]))
    # measured: the steps move the weights by 3.2e-2; fp32 communication 0 off the one-rank run, bf16 2.5e-4
    assert fp32 <= 1e-5 * moved  # fp32: the same steps up to float summation order
    assert fp32 < bf16 <= 0.02 * moved  # bf16: rounded gradients and updates, within bf16's precision of the steps


# ----------------------------------------------------------------------------------------------------
# 3. Compiled Newton-Schulz
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~25 s of inductor compilation on 2 cores when its cache is cold
def test_compiled_muon_update_equals_eager_with_one_graph_per_shape(one_thread):
    shapes = [(3, 48, 32), (2, 32, 64), (1, 40, 24)]
    torch.manual_seed(0)
    init = [torch.randn(*s) * 0.1 for s in shapes]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results, graphs = {}, []
    for compiled in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        muon = tg.Muon(params, 0.02, 0.95, 0.04, 1, "eqr", compiled=compiled)
        assert muon.steps == tg.MUON_STEPS["eqr"] == 5
        for step in range(3):
            torch.manual_seed(step)
            for p in params:
                p.grad = torch.randn_like(p)
            muon.finish(muon.launch_updates(muon.reduce_grads(), 1.0), 1.0)
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        results[compiled] = params
    for G in (torch.randn(*s) for s in shapes):  # updates of size ~0.5: measured within 1.7e-6 (summation order)
        torch.testing.assert_close(muon.update(G, 5, "eqr"), tg.muon_update(G, 5, "eqr"), rtol=0, atol=1e-5)
    graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs == [0, 0, 0, 3, 3, 3, 3]  # one graph per bank shape, compiled on the first step, none after
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # three steps at LR 0.02
