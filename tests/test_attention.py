"""Document-isolated attention without any (T x T) tensor: the record's packing and cut rule, the three kernels
(FlashAttention varlen, flex_attention with a block mask built from segment ranges, SDPA per segment on CPU) equal
to a dense-mask reference, and the fidelity fixes (per-channel resid_mix, #1089's RoPE and QAT, each preset's init)."""
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

import train_gpt_human as tg
from conftest import REPO

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]
B_ = tg.BOS_ID


def record_cut_points(stream, max_len):
    """The record's rule, written out: a segment starts at 0, at every BOS, and every max_len tokens after the
    start of its document."""
    starts = sorted({0} | {i for i, t in enumerate(stream) if t == B_})
    out = []
    for a, b in zip(starts, starts[1:] + [len(stream)]):
        out += list(range(a, b, max_len))
    return out


def dense_reference(q, k, v, seg):
    """Attention with an explicit (B, H, T, T) mask and softmax, in the inputs' dtype: the test's ground truth."""
    g = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
    allowed = (seg[:, :, None] == seg[:, None, :]).tril()[:, None]
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """FlashAttention's varlen API, faked per segment with explicit softmax (not SDPA): (total, H, D) in and out."""
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    assert int(cu_seqlens_q[-1]) == q.size(0) and len(cu_seqlens_q) % 64 == 0  # padded with the total length
    out = torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            assert b - a <= max_seqlen_q
            seg = torch.zeros(1, b - a, dtype=torch.long)
            out[a:b] = dense_reference(q[None, a:b], k[None, a:b], v[None, a:b], seg)[0]
    return out, None  # FA3 returns (out, lse)


def fake_causal(q, k, v, causal):
    return dense_reference(q, k, v, torch.zeros(q.shape[:2], dtype=torch.long))


@pytest.fixture
def kernel(monkeypatch):
    """Selects an attention kernel for the test: 'fa3' is the fake FlashAttention module above."""
    monkeypatch.setitem(tg.FLASH, "fa3", (fake_causal, fake_varlen))

    def use(name):
        monkeypatch.setitem(tg.ATTENTION, "kernel", name)
    yield use


def test_cut_points_follow_the_record_rule():
    # BOS at 0 and at T-1, a document of 9 tokens cut every 4 from its own start, a short document
    stream = [B_, 5, 6, B_, 7, 8, 9, 10, 11, 12, 13, 14, 15, B_, 16, 17, B_]
    seg, cu = tg.doc_segments(torch.tensor([stream]), 4)
    expected = record_cut_points(stream, 4)
    assert expected == [0, 3, 7, 11, 13, 16]
    assert cu.tolist()[:len(expected) + 1] == expected + [len(stream)]
    assert len(cu) == 64 and set(cu.tolist()[len(expected):]) == {len(stream)}
    assert seg.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4, 5]]
    # rows of a batch are separate contexts: a document running across the row boundary is cut there
    rows = torch.tensor([[5, 6, B_, 7], [8, 9, 10, B_]])
    seg, cu = tg.doc_segments(rows, 2048)
    assert seg.tolist() == [[0, 0, 1, 1], [2, 2, 2, 3]] and cu.tolist()[:5] == [0, 2, 4, 7, 8]
    # a stream with no BOS at all: one document from the start, cut every max_len
    seg, cu = tg.doc_segments(torch.full((1, 10), 7), 3)
    assert cu.tolist()[:5] == [0, 3, 6, 9, 10]


def test_packed_training_batches(tiny_data):
    hp = tg.Hyperparameters.from_env({"DATA_PATH": str(tiny_data), "DOC_ISOLATION": "1", "TRAIN_SEQ_LEN": "128",
                                      "TRAIN_BATCH_TOKENS": "2048", "GRAD_ACCUM_STEPS": "2"})
    stream = tg.TokenStream(tg.shard_files(str(tiny_data), "train"), hp.vocab_size).take(1025)
    loader = tg.DistributedTokenLoader(tg.shard_files(str(tiny_data), "train"), hp, 0, 1, torch.device("cpu"))
    x, y, (cu, max_len) = loader.next_batch(2)
    assert x.shape == y.shape == (1, 1024) and torch.equal(x[0], stream[:-1]) and torch.equal(y[0], stream[1:])
    expected = record_cut_points(x[0].tolist(), 128)
    assert cu.tolist()[:len(expected)] == expected and max_len == 128
    assert max(b - a for a, b in zip(expected, expected[1:] + [1024])) <= 128
    plain = tg.DistributedTokenLoader(tg.shard_files(str(tiny_data), "train"), tg.dataclasses.replace(
        hp, doc_isolation=0), 0, 1, torch.device("cpu"))
    x, y, docs = plain.next_batch(2)
    assert x.shape == (8, 128) and docs is None


@pytest.mark.parametrize("T", [300, 513])
def test_block_mask_equals_the_dense_rule_without_a_dense_tensor(T):
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(2, 100, (2, T), generator=g)
    ids[ids < 9] = B_  # many short documents
    ids[0, 0], ids[1, T - 1] = B_, B_
    ids[1, 5:400] = 7  # and one long one
    seg, _ = tg.doc_segments(ids, 1024)
    mask = tg.document_block_mask(seg)
    n = -(-T // 128)
    assert mask.kv_indices.shape == (2, 1, n, n) and mask.full_kv_indices.shape == (2, 1, n, n)  # blocks, not tokens
    reference = create_block_mask(lambda b, h, q, kv: (seg[b, q] == seg[b, kv]) & (q >= kv), 2, None, T, T,
                                  device="cpu")
    assert torch.equal(mask.to_dense(), reference.to_dense())
    # inside the long document whole key blocks are visible to whole query blocks: no mask to evaluate there
    dense = (seg[:, :, None] == seg[:, None, :]).tril()
    full = [(b, i, int(j)) for b in range(2) for i in range(n)
            for j in mask.full_kv_indices[b, 0, i, :mask.full_kv_num_blocks[b, 0, i]]]
    assert len(full) >= 1
    assert all(dense[b, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].all() for b, i, j in full)


def test_kernels_equal_a_dense_reference_in_fp64(kernel):
    """Two rows of 300 tokens: a document crossing the row boundary, BOS at position 0 and at T-1, one document
    longer than the 128-token cut."""
    torch.manual_seed(0)
    T = 300
    ids = torch.randint(2, 100, (2, T))
    ids[0, 0], ids[0, 40], ids[0, T - 1], ids[1, 200] = B_, B_, B_, B_
    q = torch.randn(2, T, 4, 16, dtype=torch.float64)
    k, v = torch.randn(2, T, 2, 16, dtype=torch.float64), torch.randn(2, T, 2, 16, dtype=torch.float64)
    seg, _ = tg.doc_segments(ids, 128)
    assert len(set(seg[0].tolist()) & set(seg[1].tolist())) == 0  # the row boundary cuts
    reference = dense_reference(q, k, v, seg)
    outputs = {}
    for name in ("fa3", "flex", "sdpa"):
        kernel(name)
        docs = tg.device_batch(ids, ids, "cpu", 128)[2]
        assert isinstance(docs, tg.BlockMask) == (name == "flex")
        outputs[name] = tg.attention(q, k, v, docs)
    for name, out in outputs.items():
        assert (out - reference).abs().max() < 1e-12, name
    kernel("fa3")  # plain causal attention goes to the FlashAttention build's dense kernel
    causal = tg.attention(q, k, v)
    assert (causal - dense_reference(q, k, v, torch.zeros(2, T, dtype=torch.long))).abs().max() < 1e-12


def record_model():
    hp = tg.Hyperparameters.from_env({"PRESET": "record", "NUM_LAYERS": "4", "LOOP_START": "1", "LOOP_END": "2",
                                      "PARALLEL_START": "3", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                      "VOCAB_SIZE": "1024", "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128"})
    torch.manual_seed(0)
    model = tg.GPT(hp).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # nonzero attention outputs, gates and smear
    return model.eval()


@pytest.mark.parametrize("name", ["fa3", "flex", "sdpa"])
def test_a_document_scores_the_same_whatever_precedes_it(kernel, name):
    kernel(name)
    model = record_model()
    g = torch.Generator().manual_seed(1)
    doc = [B_] + torch.randint(2, 1024, (150,), generator=g).tolist()  # longer than the 128-token cut
    others = [[B_] + torch.randint(2, 1024, (n,), generator=g).tolist() for n in (60, 97)]

    def nll(stream):
        ids = torch.tensor([stream])
        x, y, docs = tg.device_batch(ids[:, :-1], ids[:, 1:], "cpu", 128)
        with torch.no_grad():
            return model(x, y, reduction="none", segments=docs)

    alone = nll(doc + [5])
    for before in others:
        after = nll(before + doc + [5])[len(before):]
        assert (after - alone).abs().max() < 1e-5  # fp64 model; the softcapped logits are scored in fp32


def test_no_attention_call_gets_a_dense_mask(tiny_data_8192, tmp_path, monkeypatch):
    """A record-preset training step, Hessian collection, sliding eval and both TTT modes: SDPA never sees a mask,
    and the attention kernel gets segments or nothing, never a (T x T) tensor."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def checked_sdpa(*args, **kwargs):
        assert kwargs.get("attn_mask") is None and len(args) == 3
        return sdpa(*args, **kwargs)

    plain = tg.attention

    def checked_attention(q, k, v, segments=None):
        seen.append(type(segments).__name__)
        assert segments is None or (isinstance(segments, tuple) and segments[0].dim() == 1
                                    and isinstance(segments[1], int))
        return plain(q, k, v, segments)

    monkeypatch.setattr(F, "scaled_dot_product_attention", checked_sdpa)
    monkeypatch.setattr(tg, "attention", checked_attention)
    env = {"PRESET": "record", "NUM_LAYERS": "2", "NUM_LOOPS": "1", "LOOP_START": "0", "LOOP_END": "1",
           "PARALLEL_START": "1", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "128",
           "EVAL_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "1024", "GRAD_ACCUM_STEPS": "1", "DATA_PATH": tiny_data_8192,
           "GPTQ_CALIB_BATCHES": "1", "EVAL_BATCH_SEQS": "4", "TTT_DOC_BATCH": "2", "TTT_PHASES": "1",
           "TTT_CHUNK_TOKENS": "256"}
    monkeypatch.setattr(tg, "TTT_PREFIX_DOCS", 2)
    monkeypatch.setattr(tg, "TTT_BATCH_SEQS", 2)
    hp = tg.Hyperparameters.from_env(env)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    assert tg.select_attention(hp, rt) == ("sdpa", [])
    model = tg.GPT(hp)
    loader = tg.DistributedTokenLoader(tg.shard_files(str(tiny_data_8192), "train"), hp, 0, 1, rt.device)
    tg.train_step(model, tg.build_optimizers(model, hp, 1), loader, rt, 1, 1.0)
    tg.collect_hessians(model, hp, rt)
    assert set(seen) == {"tuple"}  # training and Hessians: segments
    val = tg.load_val_tokens(tg.dataclasses.replace(hp, val_max_tokens=600))
    tables = tg.ByteTables(torch.ones(1024 * 8, dtype=torch.long), torch.zeros(1024 * 8, dtype=torch.bool),
                         torch.zeros(1024 * 8, dtype=torch.bool))
    tg.eval_sliding(model, val, hp, rt, tables)
    tg.eval_ttt(model, val, tg.dataclasses.replace(hp, ttt_mode="chunk"), rt, tables, time.perf_counter())
    seen.clear()
    *_, adapted, n = tg.eval_ttt(model, val, hp, rt, tables, time.perf_counter())
    assert adapted == n > 0
    assert "NoneType" in seen  # phased TTT's document rows: plain causal attention (a row is one document)


def test_flash_builds_are_detected_at_import(tmp_path):
    """A module named flash_attn_interface on the path is picked up as FA3 (used on CUDA only)."""
    (tmp_path / "flash_attn_interface.py").write_text("def flash_attn_func(*a, **k): pass\n"
                                                      "def flash_attn_varlen_func(*a, **k): pass\n")
    code = ("import torch, train_gpt_human as tg; hp = tg.Hyperparameters(doc_isolation=1); "
            "rt = tg.Runtime(0, 1, torch.device('cpu'), 'log.txt'); print(list(tg.FLASH), tg.select_attention(hp, rt)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["['fa3']", "sdpa"], out.stderr[-2000:]
    with pytest.raises(tg.ConfigError, match="ATTN_KERNEL=flex needs CUDA"):
        tg.select_attention(tg.Hyperparameters(attn_kernel="flex"), tg.Runtime(0, 1, torch.device("cpu"), "log.txt"))


def test_resid_mix_is_per_channel_trains_and_round_trips(tiny_data, tmp_path):
    hp = tg.Hyperparameters.from_env({"DATA_PATH": str(tiny_data), "NUM_LAYERS": "2", "MODEL_DIM": "64",
                                      "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "128",
                                      "TRAIN_BATCH_TOKENS": "1024", "GRAD_ACCUM_STEPS": "1", "ENGRAM_BUCKETS": "64",
                                      "VE_DIM": "16", "TARGET_BYTES": "2000000"})
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    torch.manual_seed(0)
    model = tg.GPT(hp)
    assert model.blocks[0].resid_mix.shape == (2, 64)
    opt = tg.build_optimizers(model, hp, 1)
    loader = tg.DistributedTokenLoader(tg.shard_files(str(tiny_data), "train"), hp, 0, 1, rt.device)
    for _ in range(3):
        tg.train_step(model, opt, loader, rt, 1, 1.0)
    mix = model.blocks[1].resid_mix.detach()
    assert mix[0].std() > 1e-4 and mix[1].std() > 1e-4  # the channels learned different mixes
    hessians = tg.collect_hessians(model, hp, rt)
    loaded = tg.load_artifact(tg.quantize_model(model, hessians, hp, rt, 10_000), hp, "cpu")
    assert torch.allclose(loaded.blocks[1].resid_mix, mix, atol=1e-3)  # fp16 passthrough


def test_rope_base_scales_as_1089_for_the_seed_only():
    def angles(hp, T):
        rot = tg.Rotary(tg.ROPE_DIMS, tg.ROPE_BASE, hp.rope_ntk_len)
        x = torch.zeros(1, T, 1, 64)
        x[..., 1] = 1.0  # (1, 0) in the second rotated pair (frequency base^(-2/16)): out (cos, sin) of its angle
        y = rot(x)
        return torch.atan2(y[0, :, 0, 9], y[0, :, 0, 1])

    seed, record = tg.Hyperparameters(), tg.Hyperparameters.from_env({"PRESET": "record"})
    base = 10000 * 2 ** (16 / 14)
    assert base == pytest.approx(22082, abs=1)  # #1089's base at 2,048 tokens
    t = torch.arange(2048, dtype=torch.float64)
    for hp, T, b in ((seed, 2048, base), (seed, 1024, 10000.0), (record, 2048, 10000.0)):
        expected = torch.atan2(torch.sin(t[:T] / b ** (2 / 16)), torch.cos(t[:T] / b ** (2 / 16)))
        assert (angles(hp, T).double() - expected).abs().max() < 2e-3, (hp.preset, T)


def test_init_follows_each_reference():
    small = {"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "VE_DIM": "16",
             "ENGRAM_BUCKETS": "64"}
    torch.manual_seed(0)
    seed = tg.GPT(tg.Hyperparameters.from_env(small))
    L, hd = 2, 16
    for i in range(L):
        for h in range(4):  # output rows of head h are -0.05 x the value rows of its KV head (#1089)
            v_rows = seed.kv[L + i][(h // 2) * hd:(h // 2 + 1) * hd]
            assert torch.equal(seed.qo[L + i][h * hd:(h + 1) * hd], -0.05 * v_rows)
    ve = seed.ve_proj.detach()  # (kv_dim 32, ve_dim 16): orthonormal columns
    assert torch.allclose(ve.T @ ve, torch.eye(16), atol=1e-5)
    record = tg.GPT(tg.Hyperparameters.from_env(dict(small, PRESET="record", NUM_LOOPS="0", PARALLEL_START="0")))
    assert record.qo[L:].abs().max() == 0 and record.qo[:L].abs().max() > 0


def test_late_qat_is_1089s(monkeypatch):
    assert tg.QAT_QMAX == 15  # int5
    monkeypatch.setattr(tg.LateQAT, "enabled", True)
    monkeypatch.setattr(tg.LateQAT, "alpha", torch.tensor(4.0))
    w = torch.tensor([[0.30, -0.25, 0.01, 0.1], [3.0, -1.5, 0.7, 2.2]], requires_grad=True)
    step = torch.tensor([[1 / 15], [0.9995 * 3.0 / 15]])  # row 0: the 1/15 floor; row 1: 0.9995 row-max / 15
    scaled = (w.detach() / step).clamp(-16, 15)
    expected = (scaled.floor() + torch.sigmoid(4.0 * (scaled - scaled.floor() - 0.5))) * step
    out = tg.fake_quantized(w)
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    assert (w.grad != 0).sum() == 7 and w.grad[1, 0] == 0  # the soft round passes gradients; the clamp at 15 not
    with torch.no_grad():
        assert torch.equal(tg.fake_quantized(w), w)  # no gradients, no QAT (eval, Hessians)
    torch.manual_seed(0)
    hp = tg.Hyperparameters.from_env({"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                      "VE_DIM": "16", "ENGRAM_BUCKETS": "64"})
    model = tg.GPT(hp)
    with torch.no_grad():
        model.engram.proj.normal_(std=0.3)
    ids = torch.randint(2, 1024, (1, 16))
    on = model.engram(ids)
    monkeypatch.setattr(tg.LateQAT, "enabled", False)
    assert not torch.allclose(on, model.engram(ids), atol=1e-4)  # EngramLite's projection is fake-quantised too


@torch.library.custom_op("pgtest::varlen", mutates_args=())
def traced_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    return fake_varlen(q, k, v, cu, cu, 1 << 30, 1 << 30, True)[0]


@traced_varlen.register_fake
def _(q, k, v, cu):
    return torch.empty_like(q)


def test_one_compiled_graph_for_every_cu_seqlens_length(kernel, monkeypatch):
    """With a varlen kernel that torch.compile traces (FA3 registers custom ops; here a stand-in), batches whose
    cu_seqlens pad to 64 and to 128 entries run one graph: the length is marked dynamic."""
    monkeypatch.setitem(tg.FLASH, "fa3", (fake_causal, lambda q, k, v, cu_seqlens_q, **_: traced_varlen(q, k, v,
                                                                                                   cu_seqlens_q)))
    kernel("fa3")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = record_model()
    compiled = torch.compile(model, dynamic=False, backend="eager")
    for n_docs in (3, 90):  # 4 and 91 segments: cu_seqlens of 64 and 128 entries
        ids = torch.randint(2, 1024, (1, 1024), generator=torch.Generator().manual_seed(n_docs))
        ids[0, torch.linspace(0, 1023, n_docs).long()] = B_
        x, y, docs = tg.device_batch(ids[:, :-1], ids[:, 1:], "cpu", 2048)
        with torch.no_grad():
            assert torch.allclose(compiled(x, y, segments=docs), model(x, y, segments=docs))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def _varlen_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _varlen_backward(ctx, grad):
    q, k, v, cu = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        return (*torch.autograd.grad(fake_varlen(*inputs, cu, cu, 1 << 30, 1 << 30, True)[0], inputs, grad), None)


traced_varlen.register_autograd(_varlen_backward, setup_context=_varlen_context)


def test_ttt_warm_up_compiles_every_graph_the_timed_eval_uses(kernel, monkeypatch, tmp_path):
    """Phased TTT compiled with dynamic shapes (FA3 stand-in, eager backend): after warm_up_ttt on random tokens, the
    timed eval of other documents (batches of 4, 1-row steps, a global phase) compiles nothing more.  A warm-up on
    1-row batches, or with smaller adapters, left 2 recompiles on the eval clock (a size of 1 specialises; the
    adapters' shapes are static).  Four graphs: many-row and 1-row adapter steps, the global phase's
    training step and the no-grad sliding pass that scores the queue's tail once the budget guard stops
    adapting."""
    from test_ttt_legality import synthetic_tables

    monkeypatch.setitem(tg.FLASH, "fa3", (fake_causal, lambda q, k, v, cu_seqlens_q, **_: traced_varlen(q, k, v,
                                                                                                   cu_seqlens_q)))
    kernel("fa3")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    hp = tg.Hyperparameters.from_env({"PRESET": "record", "NUM_LAYERS": "4", "LOOP_START": "1", "LOOP_END": "2",
                                      "PARALLEL_START": "3", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                      "VOCAB_SIZE": "1024", "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128",
                                      "TTT_DOC_BATCH": "4"})
    monkeypatch.setattr(tg, "TTT_PREFIX_DOCS", 4)
    monkeypatch.setattr(tg, "TTT_PAUSE_RANKS", 1)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    torch.manual_seed(0)
    model = tg.GPT(hp)
    compiled = torch.compile(model, dynamic=True, backend="eager")
    tg.warm_up_ttt(compiled, hp, rt, synthetic_tables())
    warmed = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(1)
    parts = [torch.cat([torch.tensor([B_]), torch.randint(2, 1024, (n - 1,), generator=g)])
             for n in torch.randint(20, 300, (13,), generator=g).tolist()]
    tokens = torch.cat(parts + [torch.tensor([B_])])
    *_, adapted, batches = tg.eval_ttt(compiled, tokens, hp, rt, synthetic_tables(), time.perf_counter())
    assert adapted == batches == 4 and "ttt:segment 3/3" in (tmp_path / "log.txt").read_text()
    assert warmed == 4 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == warmed


class CudaLikeRuntime(tg.Runtime):
    """A CPU runtime that select_attention treats as CUDA: every candidate kernel is tried."""

    @property
    def is_cuda(self):
        return True

    def sync(self):
        pass


def test_attention_falls_back_to_the_first_kernel_that_passes_its_probe(monkeypatch, tmp_path):
    """On 'CUDA' with documents: FA3 that raises, then flex (no backward on the CPU), then SDPA, which runs; the
    failures are returned for the log, each naming its kernel and error.  ATTN_KERNEL forces one and fails loudly."""
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(tg.FLASH, "fa3", (broken, broken))
    monkeypatch.setattr(torch.backends.cuda, "enable_math_sdp", lambda on: None)
    monkeypatch.setitem(tg.ATTENTION, "flex", tg.flex_attention)
    rt = CudaLikeRuntime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    hp = tg.Hyperparameters(doc_isolation=1, compile=0)
    kernel, failures = tg.select_attention(hp, rt)
    assert kernel == "sdpa" and tg.ATTENTION["kernel"] == "sdpa"
    assert [f.split(":")[0] for f in failures] == ["fa3", "flex"]
    assert "no kernel image" in failures[0]
    assert tg.select_attention(tg.Hyperparameters(compile=0), rt) == ("sdpa", ["fa3: RuntimeError: no kernel image "
                                                                             "is available for execution on the device"])
    with pytest.raises(tg.ConfigError, match="fa3: RuntimeError: no kernel image"):
        tg.select_attention(tg.Hyperparameters(attn_kernel="fa3", compile=0), rt)
