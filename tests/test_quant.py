"""The compression stage: GPTQ with SDClip scales sized to fit, LQER, AWQ-lite, packing and the artifact
format.

- packing is exact (codes, fp16 scales, passthrough tensors), load_artifact rebuilds the dequantized model, and a
  damaged artifact (flipped byte anywhere, truncation) is a ValueError, never silently different weights;
- GPTQ beats round-to-nearest on the layer-output error ||(W - W_hat) X|| with real activations, at int5/6/7;
- SDClip sizing fits the budget and says so in the log when its factor search ends on the finest bound; a
  budget below the coarsest codes is a ConfigError before any GPTQ solve; a measured miss sizes again, at
  most SIZING_TRIES times;
- AWQ-lite picks the most salient column group, codes it at int8 inside the GPTQ solve, and the sizing counts it;
- the seed-size model (default Hyperparameters, 30.7M parameters) lands in [15.9 MB, 16 MB] total in one
  sizing, a lower TARGET_BYTES is honoured, an impossible one is a ConfigError;
- a tiny end-to-end run: roundtrip bpb close to prequant and equal to an eval of the artifact it wrote;
  SNAPSHOT (written by one run, loaded by the next) reproduces the numbers.

test_benchmark_report (run with -s to see it) prints the quantization gap of SDClip rounding, GPTQ and GPTQ with
AWQ-lite at one byte budget on a small CPU-trained model.  The full-size test prints quantize_model's time.
"""
import copy
import dataclasses
import os
import re
import time

import pytest
import torch

import train_gpt_human as tg
from conftest import REPO, TINY_ENV, TOKENIZER_1024, final_metric, run_script

SCRIPT = REPO / "train_gpt_human.py"
CODE_BYTES = (REPO / "train_gpt.py").stat().st_size if (REPO / "train_gpt.py").exists() else 20_000


def env_for(data_path, **overrides):
    env = dict(TINY_ENV, DATA_PATH=str(data_path), TOKENIZER_PATH=str(TOKENIZER_1024), ITERATIONS="30")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class Trained:
    """A small model trained 30 steps in-process, with Hessians from its real activations on training batches.
    Width 128 and MLP_MULT 3.5 so that the bank matrices, not the embeddings, are most of the artifact."""

    def __init__(self, data_path, log_dir):
        self.data_path, self.log_dir = data_path, log_dir
        self.hp = tg.Hyperparameters.from_env(env_for(data_path, MODEL_DIM=128, MLP_MULT=3.5))
        self.rt = tg.Runtime(0, 1, torch.device("cpu"), str(log_dir / "log.txt"))
        self.tables = tg.build_byte_tables(tg.load_tokenizer(self.hp), self.hp.vocab_size)
        self.val = tg.load_val_tokens(self.hp)
        torch.manual_seed(0)
        model = tg.GPT(self.hp)
        saved = tg.LateQAT.enabled, tg.LateQAT.alpha
        try:
            tg.train(model, self.hp, self.rt)
        finally:
            tg.LateQAT.enabled, tg.LateQAT.alpha = saved
        self.state = copy.deepcopy(model.state_dict())
        self.hessians = tg.collect_hessians(model, self.hp, self.rt)

    def model(self):
        model = tg.GPT(self.hp)
        model.load_state_dict(self.state)
        return model

    def bpb(self, model):
        return tg.eval_full(model, self.val, self.hp, self.rt, self.tables)[1]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    return Trained(tiny_data, tmp_path_factory.mktemp("quant_trained"))


class SerializeSpy:
    """Records the entries of the last serialize() call (quantize_model's last build is the shipped one)."""

    def __init__(self, monkeypatch):
        self.entries, self.real = None, tg.serialize

        def spy(entries):
            self.entries = list(entries)
            return self.real(entries)

        monkeypatch.setattr(tg, "serialize", spy)


def random_entries(seed=0):
    """Every bit width 2..8 with codes hitting +-qmax, fp16-exact scales; fp16 passthrough of 0-, 1- and 3-D."""
    g = torch.Generator().manual_seed(seed)
    entries = []
    for bits in range(2, 9):
        qmax = tg.qmax_of(bits)
        rows, cols = 3 + bits, 5 + 2 * bits
        codes = torch.randint(-qmax, qmax + 1, (rows, cols), generator=g, dtype=torch.int64).to(torch.int8)
        codes[0, 0], codes[-1, -1] = qmax, -qmax
        scale = (torch.rand(rows, generator=g) * 0.1 + 1e-3).half().float()
        entries.append(tg.Entry(f"bank#{bits}", tg.KIND_INT, bits, (rows, cols), codes, scale))
    for name, shape in (("scalar", ()), ("vec", (7,)), ("cube", (2, 3, 4))):
        values = (torch.randn(shape, generator=g) * 3).half()
        values.view(-1)[0] = 65504.0  # fp16 max survives the byte shuffle
        entries.append(tg.Entry(name, tg.KIND_FP16, 16, shape, None, values))
    return entries


# ------------------------------------------------------------------------------------------------------------
# 1. packing is exact; damage is a ValueError
# ------------------------------------------------------------------------------------------------------------


def test_serialize_roundtrip_exact_codes_scales_and_passthrough():
    entries = random_entries()
    state = tg.deserialize(tg.serialize(entries))
    assert list(state) == [e[0] for e in entries]
    for name, kind, bits, shape, codes, values in entries:
        out = state[name]
        assert tuple(out.shape) == shape and out.dtype == torch.float32
        if kind == tg.KIND_INT:
            assert torch.equal(out, codes.float() * values[:, None])
            recovered_scale = out.abs().amax(dim=1) / codes.float().abs().amax(dim=1)
            assert torch.equal(recovered_scale, values)  # the row holding the largest code gives the scale back
            assert torch.equal((out / values[:, None]).round().to(torch.int8), codes)
        else:
            assert torch.equal(out, values.float())


def test_compress_roundtrip():
    raw = tg.serialize(random_entries(1))
    blobs = [tg.compress_bytes(raw, fast=fast) for fast in (False, True)]
    assert all(tg.decompress_bytes(blob) == raw for blob in blobs)
    assert all(len(blob) < len(raw) for blob in blobs)


def test_load_artifact_rebuilds_the_dequantized_model(trained, monkeypatch):
    spy = SerializeSpy(monkeypatch)
    model = trained.model()
    blob = tg.quantize_model(model, trained.hessians, trained.hp, trained.rt, CODE_BYTES)
    assert tg.decompress_bytes(blob) == spy.real(spy.entries)  # the recorded entries are the shipped ones
    loaded = tg.load_artifact(blob, trained.hp, torch.device("cpu")).state_dict()
    original = model.state_dict()
    assert set(loaded) == set(original)
    expected = {}
    for name, kind, bits, shape, codes, values in spy.entries:
        if kind == tg.KIND_INT:
            assert codes.dtype == torch.int8 and int(codes.abs().max()) <= tg.qmax_of(bits)
            expected[name] = codes.float() * values.half().float()[:, None]
        else:
            expected[name] = values.float()
    for bank in tg.BANKS:
        rows = sorted((int(k.split("#")[1]), k) for k in expected if k.startswith(bank + "#"))
        assert [i for i, _ in rows] == list(range(original[bank].size(0)))
        expected[bank] = torch.stack([expected.pop(k) for _, k in rows])
    for name, t in loaded.items():
        assert torch.equal(t, expected[name].view_as(t)), name
        err = (t - original[name].float()).norm() / original[name].float().norm().clamp_min(1e-12)
        assert err < 0.08, (name, float(err))  # the model's weights, not any weights: measured <= 0.053 (int6 at
        # SDClip's finest factor, the budget being loose; any other weights would be ~1.4 away)
    bits = {e[2] for e in spy.entries if e[0].split("#")[0] in tg.BANKS}
    assert bits <= {5, 6, 7}


def check_damaged(blob, reference, label):
    """Decoding must raise ValueError, or (a brotli stream has a few don't-care bits) give the same bytes."""
    try:
        raw = tg.decompress_bytes(blob)
        tg.deserialize(raw)
    except ValueError as e:
        assert "corrupt" in str(e) or "not ours" in str(e) or "truncated" in str(e), (label, str(e))
        return "error"
    assert raw == reference, f"{label}: damaged artifact decoded to different weights"
    return "same"


def test_every_flip_of_serialized_bytes_is_caught():
    raw = tg.serialize(random_entries(3))
    header_end = 9
    table_end = raw.index(b"cube") + 4 + 3 + 3 * 4
    regions = {"magic+version+count": range(0, header_end), "table": range(header_end, table_end),
               "payload": range(table_end, len(raw) - 4), "crc": range(len(raw) - 4, len(raw))}
    assert all(len(r) for r in regions.values())
    for region, positions in regions.items():
        for pos in positions:
            for mask in (0x01, 0x80, 0xFF):
                damaged = bytearray(raw)
                damaged[pos] ^= mask
                with pytest.raises(ValueError, match="corrupt or not ours"):
                    tg.deserialize(bytes(damaged))
    for n in range(len(raw)):
        with pytest.raises(ValueError, match="corrupt or not ours"):
            tg.deserialize(raw[:n])


def test_every_flip_and_truncation_of_small_artifact_is_caught():
    raw = tg.serialize(random_entries(4))
    blob = tg.compress_bytes(raw)
    outcomes = {"error": 0, "same": 0}
    for pos in range(len(blob)):
        for mask in (0x01, 0x10, 0x80, 0xFF):
            damaged = bytearray(blob)
            damaged[pos] ^= mask
            outcomes[check_damaged(bytes(damaged), raw, f"flip {pos}^{mask:#x}")] += 1
    for n in range(len(blob)):
        assert check_damaged(blob[:n], raw, f"truncated to {n}") == "error"
    assert outcomes["same"] <= 0.01 * outcomes["error"], outcomes
    print(f"\nbrotli: {len(blob)} bytes, 4 flips per byte: {outcomes}")


def test_damaged_real_artifact_never_loads_different_weights(trained):
    blob = tg.quantize_model(trained.model(), trained.hessians, trained.hp, trained.rt, CODE_BYTES)
    raw = tg.decompress_bytes(blob)
    g = torch.Generator().manual_seed(0)
    positions = list(range(16)) + list(range(len(blob) - 16, len(blob))) + torch.randint(
        16, len(blob) - 16, (120,), generator=g).tolist()
    outcomes = {"error": 0, "same": 0}
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= 1 << (pos % 8)
        outcome = check_damaged(bytes(damaged), raw, f"flip at {pos}/{len(blob)}")
        outcomes[outcome] += 1
        if outcome == "error":
            with pytest.raises(ValueError):
                tg.load_artifact(bytes(damaged), trained.hp, torch.device("cpu"))
    assert outcomes["error"] >= 0.95 * len(positions), outcomes
    for n in (0, 1, 5, len(blob) // 3, len(blob) // 2, len(blob) - 5, len(blob) - 1):
        with pytest.raises(ValueError, match="corrupt|truncated"):
            tg.load_artifact(blob[:n], trained.hp, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------------------
# 2. GPTQ beats round-to-nearest on real activations
# ------------------------------------------------------------------------------------------------------------


def output_error(W, q, scale, H):
    """||(W - W_hat) X||_F^2 / tokens = trace(D H D^T) with H = X^T X / tokens."""
    D = W - q.float() * scale[:, None]
    return float(((D @ H) * D).sum())


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_gptq_beats_rtn_on_real_activations(trained, bits):
    """SDClip scales (k * std(row) / qmax, k by matrix type) with GPTQ's error feedback vs rounding with the same
    scales, on every bank matrix."""
    hp, state = trained.hp, trained.state
    totals, per_matrix = {"gptq": 0.0, "rtn": 0.0}, []
    for bank, idx, key, group in tg.bank_matrices(hp.num_layers):
        W, H = state[bank][idx].float(), trained.hessians[key]
        k = tg.CLIP_SIGMAS[group.split(".")[0]]
        result = tg.gptq_quantize(W, H, bits, k)
        assert result is not None, f"cholesky failed on {bank}#{idx}"
        assert torch.equal(result[1], tg.sd_scales(W, bits, k))  # the scale is SDClip's, not the clip search's
        errs = {"gptq": output_error(W, *result, H), "rtn": output_error(W, *tg.quantize_rtn(W, bits, sigmas=k), H)}
        for name, v in errs.items():
            totals[name] += v
        per_matrix.append(errs["gptq"] / errs["rtn"])
        assert errs["gptq"] < errs["rtn"], (bank, idx, errs)
    ratio = totals["gptq"] / totals["rtn"]
    print(f"\nSDClip int{bits}: GPTQ/RTN output error {ratio:.3f}; "
          f"per matrix {min(per_matrix):.3f}..{max(per_matrix):.3f}")
    assert ratio < 0.7


def test_gptq_embedding_lowers_the_output_head_error(trained):
    """The tied embedding is the output head: GPTQ with the Hessian of the final-norm output (collected by the same
    hooks) against rounding with the same SDClip scales at int8 and int7, error measured through that Hessian."""
    W, H = trained.state["tok_emb.weight"].float(), trained.hessians["head_in"]
    assert H.shape == (trained.hp.model_dim,) * 2 and torch.allclose(H, H.T)
    for bits in (7, 8):
        k = tg.CLIP_SIGMAS["embed"]
        q, s = tg.gptq_quantize(W, H, bits, k)
        gptq, rtn = output_error(W, q, s, H), output_error(W, *tg.quantize_rtn(W, bits, sigmas=k), H)
        print(f"\nembedding int{bits}: GPTQ/RTN head error {gptq / rtn:.3f}")
        assert gptq < 0.8 * rtn


# the record's (measured x0.987 at worst); a higher rank on fewer tensors (LQER_TOP_K patched; measured
# x0.980)
@pytest.mark.parametrize("rank,top_k,drop", [(2, 4, 0.99), (4, 3, 0.985)])
def test_lqer_lowers_the_error_of_the_tensors_it_touches(trained, monkeypatch, rank, top_k, drop):
    monkeypatch.setattr(tg, "LQER_TOP_K", top_k)
    hp = dataclasses.replace(trained.hp, lqer_rank=rank)
    model = trained.model()
    with_lqer = tg.load_artifact(tg.quantize_model(model, trained.hessians, hp, trained.rt, CODE_BYTES), hp,
                                 torch.device("cpu"))
    plain_hp = dataclasses.replace(hp, lqer_rank=0)
    plain = tg.load_artifact(tg.quantize_model(model, trained.hessians, plain_hp, trained.rt, CODE_BYTES), hp,
                             torch.device("cpu"))
    touched, untouched = [], []
    for bank, idx, _, _ in tg.bank_matrices(hp.num_layers):
        W = trained.state[bank][idx].float()
        a = float((W - getattr(with_lqer, bank)[idx].detach()).norm())
        b = float((W - getattr(plain, bank)[idx].detach()).norm())
        (touched if a != b else untouched).append((a, b))
    print(f"\nLQER rank {rank}: error x{max(a / b for a, b in touched):.4f} on the tensor it helps least")
    assert len(touched) == top_k  # exactly LQER_TOP_K tensors get a correction
    assert all(a < drop * b for a, b in touched), touched  # each one's error drops
    assert all(a == b for a, b in untouched)


def test_awq_picks_the_most_salient_groups_across_matrices():
    """Saliency = sum over a group's columns of RMS(input) x mean|W|, compared across matrices as is; matrices
    already at int8 are not candidates.  Checked against a brute-force ranking."""
    g = torch.Generator().manual_seed(0)
    W = {n: torch.randn(16, 192, generator=g) for n in "abc"}
    W["a"][:, 64:128] *= 3.0  # a's middle group: large weights
    H = {n: torch.diag(torch.rand(192, generator=g) + 0.5) for n in "abc"}
    H["b"][:64, :64] *= 16.0  # b's first group: large inputs (RMS x4)
    W["c"] *= 10.0  # the most salient of all, but already int8
    targets = [tg.Target("a", W["a"], "a", "mlp", 6), tg.Target("b", W["b"], "b", "attn", 6),
               tg.Target("c", W["c"], "c", "embed", 8)]
    assert tg.AWQ_GROUP_SIZE == 64
    hp = dataclasses.replace(tg.Hyperparameters(), awq_groups=2)
    cols = tg.awq_columns(targets, H, hp)
    scores = sorted(((float((H[n].diagonal().sqrt() * W[n].abs().mean(0))[a:a + 64].sum()), n, a)
                     for n in "ab" for a in (0, 64, 128)), reverse=True)
    assert {(n, a) for _, n, a in scores[:2]} == {("a", 64), ("b", 0)}
    assert [c.tolist() for c in cols[:2]] == [list(range(64, 128)), list(range(64))] and cols[2] is None
    assert tg.awq_columns(targets, H, dataclasses.replace(hp, awq_groups=0)) == [None] * 3
    two = tg.awq_columns(targets, H, dataclasses.replace(hp, awq_groups=4))  # two groups of one matrix: both
    assert sum(0 if c is None else len(c) for c in two) == 4 * 64 and two[2] is None


def test_awq_group_is_int8_inside_the_gptq_solve(trained):
    """The protected columns get int8 codes at the step awq_step (the row's clip in sigmas over +-127) in the same
    GPTQ solve: the other columns' codes change too (their error feedback sees the finer columns), the group's
    own error drops (the step is 4x finer; GPTQ moves earlier columns' error into it), and the output error drops."""
    W, H = trained.state["mlp_up"][0].float(), trained.hessians["mlp_in.0"]
    k, cols = tg.CLIP_SIGMAS["mlp"], torch.arange(64, 128)
    plain = tg.gptq_quantize(W, H, 6, k)
    q, s = tg.gptq_quantize(W, H, 6, k, cols)
    assert torch.equal(s, plain[1])
    rest = torch.ones(W.size(1), dtype=torch.bool)
    rest[cols] = False
    assert int(q[:, rest].abs().max()) <= 31 < int(q[:, cols].abs().max()) <= 127
    assert not torch.equal(q[:, rest], plain[0][:, rest])
    step = tg.awq_step(s, 6)
    assert torch.allclose(step, (k * W.std(dim=1) / 127).half().float(), rtol=2e-3)
    W_hat = q.float() * s[:, None]
    W_hat[:, cols] = q[:, cols].float() * step[:, None]
    group_err = (W - W_hat)[:, cols].square().sum() / (W - plain[0].float() * s[:, None])[:, cols].square().sum()
    D, D0 = W - W_hat, W - plain[0].float() * s[:, None]
    out, out0 = float(((D @ H) * D).sum()), float(((D0 @ H) * D0).sum())
    print(f"\nAWQ-lite group error x{float(group_err):.3f}, output error x{out / out0:.3f}")
    assert group_err < 0.5 and out < 0.8 * out0  # measured 0.32 and 0.55


def test_awq_artifact_roundtrip_sizing_and_lqer_on_top(trained, tmp_path, monkeypatch):
    """AWQ_GROUPS=2 with the record's LQER and an int7 embedding at a budget that needs sizing: the groups ship as
    int8 entries NAME.awqFIRST with their columns zero in the matrix's codes; load_artifact writes them back; LQER is
    fitted to the error of the weights as loaded (groups included); the sizing counts the groups, so the artifact
    lands on the budget in one sizing."""
    hp = dataclasses.replace(trained.hp, embed_bits=7, awq_groups=2, lqer_rank=2)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "finest.txt"))
    hp = dataclasses.replace(hp, target_bytes=int(0.6 * len(tg.quantize_model(trained.model(), trained.hessians,
                                                                              hp, rt, 0))))
    spy, fitted, real_lqer = SerializeSpy(monkeypatch), {}, tg.lqer_entries
    monkeypatch.setattr(tg, "lqer_entries", lambda t, d, h: fitted.update({e[0]: w for e, w in zip(t, d)})
                        or real_lqer(t, d, h))
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "sized.txt"))
    blob = tg.quantize_model(trained.model(), trained.hessians, hp, rt, 0)
    log = open(rt.log_path).read()
    assert "missed the budget" not in log and log.count("quant:sdclip factor:") == 1
    assert 0.97 * hp.target_bytes <= len(blob) <= hp.target_bytes
    entries = {e[0]: e for e in spy.entries}
    groups = [n for n in entries if ".awq" in n]
    assert len(groups) == 2 and all(entries[n][2] == 8 and entries[n][3][1] == 64 for n in groups)
    assert log_fields(rt.log_path, "quant:awq")  # the log names them
    expected = {}
    for n in groups:
        base, start = n.rsplit(".awq", 1)
        start, (_, _, bits, _, q, s) = int(start), entries[base]
        assert not q[:, start:start + 64].any()  # zero in the matrix's own codes
        mean_code = float(entries[n][4].abs().float().mean())  # a step ~4x finer than the matrix's
        assert 2 * float(q.abs().float().mean()) < mean_code and int(entries[n][4].abs().max()) <= 127
        assert torch.equal(entries[n][5], tg.awq_step(s, bits))
        W_hat = expected.setdefault(base, q.float() * s[:, None])
        W_hat[:, start:start + 64] = entries[n][4].float() * entries[n][5][:, None]
    for base, W_hat in expected.items():
        assert torch.equal(fitted[base], W_hat)  # LQER saw the groups
    loaded = tg.load_artifact(blob, hp, torch.device("cpu")).state_dict()
    for base, W_hat in expected.items():
        if base + ".lqA" in entries:
            continue  # plus LQER's correction: covered by the check above and the LQER tests
        bank, _, idx = base.partition("#")
        assert torch.equal(loaded[bank][int(idx)] if idx else loaded[base], W_hat)


def test_sdclip_sizing_fits_and_uses_the_budget(trained, tmp_path):
    hp = dataclasses.replace(trained.hp, embed_bits=8)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "finest.txt"))
    natural = len(tg.quantize_model(trained.model(), trained.hessians, hp, rt, 0))  # far under 16 MB: finest codes
    assert float(log_fields(rt.log_path, "quant:sdclip")["factor"]) == 0.25  # the finest the search allows
    warning = log_fields(rt.log_path, "quant:warning")  # and the log says that the search stopped there
    assert warning["factor"] == "0.250"
    assert "the finest codes allowed leave the budget unused" in warning["text"]
    assert abs(float(warning["estimate"]) - natural) < 0.01 * natural < 0.5 * float(warning["budget"])
    target = int(0.6 * natural)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "sized.txt"))
    blob = tg.quantize_model(trained.model(), trained.hessians, dataclasses.replace(hp, target_bytes=target), rt, 0)
    log = open(rt.log_path).read()
    sizing = log_fields(rt.log_path, "quant:sdclip")
    print(f"\nsdclip at 60% of the finest size: {len(blob)} of {target} bytes; {sizing}")
    misses = [float(line.split(" by ")[1].split("%")[0])
              for line in log.splitlines() if "missed the budget" in line]
    # the estimate is good to a few 0.1%: at most one small miss, then a second sizing (measured: 0.19%)
    assert len(misses) <= 1 and all(m < 1.0 for m in misses)
    assert log.count("quant:sdclip factor:") == 1 + len(misses)
    assert 0.97 * target <= len(blob) <= target
    assert "quant:warning" not in log  # a factor inside the bounds: nothing to say


def test_a_budget_below_the_coarsest_codes_is_a_config_error_before_any_gptq(trained, tmp_path, monkeypatch):
    """With the int8 embedding table fixed, a budget below the coarsest SDClip codes: sdclip_plan raises a
    ConfigError with its estimate against the budget, before a single matrix is GPTQ'd (no time wasted on a
    doomed pass)."""
    hp = dataclasses.replace(trained.hp, embed_bits=0)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "finest.txt"))
    target = int(0.64 * len(tg.quantize_model(trained.model(), trained.hessians, hp, rt, 0)))

    def no_gptq(*args):
        raise AssertionError("GPTQ ran on a budget that cannot fit")

    monkeypatch.setattr(tg, "gptq_all", no_gptq)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "coarsest.txt"))
    message = (r"the model does not fit: \d+ bytes at the coarsest SDClip codes > \d+; lower MATRIX_BITS, "
               r"set EMBED_BITS or raise TARGET_BYTES")
    with pytest.raises(tg.ConfigError, match=message) as err:
        tg.quantize_model(trained.model(), trained.hessians, dataclasses.replace(hp, target_bytes=target), rt,
                          0)
    estimate, budget = (float(w) for w in re.findall(r"(\d+) bytes at .* > (\d+);", str(err.value))[0])
    print(f"\nsdclip below the coarsest codes: {err.value}")
    assert budget < target < estimate < 1.2 * target  # measured 319 k vs 298 k


def test_a_measured_miss_sizes_again_with_a_smaller_aim(trained, tmp_path, monkeypatch):
    """The real compressor's artifact over the budget (here: padded by 5% on the first pass) sizes again,
    aiming lower by the measured ratio; SIZING_TRIES misses in a row are a ConfigError naming the sizes."""
    hp = dataclasses.replace(trained.hp, embed_bits=7)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "finest.txt"))
    finest = len(tg.quantize_model(trained.model(), trained.hessians, hp, rt, 0))
    hp = dataclasses.replace(hp, target_bytes=int(0.6 * finest))
    real_gptq_all, real_compress, misses = tg.gptq_all, tg.compress_bytes, []

    def gptq_all(*args):
        misses.append(len(misses) < misses_wanted)  # whether the artifact built from these entries misses
        return real_gptq_all(*args)

    def compress_bytes(raw, fast=False):
        blob = real_compress(raw, fast)
        if fast or not misses or not misses[-1]:
            return blob
        misses[-1] = False  # the artifact's own compression: only once per pass
        return blob + bytes(max(hp.target_bytes - len(blob), 0) + hp.target_bytes // 20)

    monkeypatch.setattr(tg, "gptq_all", gptq_all)
    monkeypatch.setattr(tg, "compress_bytes", compress_bytes)
    misses_wanted = 1
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "miss.txt"))
    blob = tg.quantize_model(trained.model(), trained.hessians, hp, rt, 0)
    log = open(rt.log_path).read()
    factors = [float(line.split("factor:")[1].split()[0]) for line in log.splitlines()
               if line.startswith("quant:sdclip factor:")]
    assert len(misses) == len(factors) == 2 and log.count("quant:sdclip missed the budget by 5.") == 1
    assert factors[1] > factors[0]  # coarser codes for the smaller aim
    assert 0.9 * hp.target_bytes <= len(blob) <= hp.target_bytes
    assert tg.load_artifact(blob, hp, torch.device("cpu")) is not None
    misses.clear()
    misses_wanted = tg.SIZING_TRIES
    message = (rf"artifact \d+ bytes > {hp.target_bytes} after {tg.SIZING_TRIES} sizings; lower MATRIX_BITS "
               r"or EMBED_BITS, or raise TARGET_BYTES")
    with pytest.raises(tg.ConfigError, match=message):
        tg.quantize_model(trained.model(), trained.hessians, hp, rt, 0)
    assert len(misses) == tg.SIZING_TRIES


# ------------------------------------------------------------------------------------------------------------
# 3. size budget: the seed-size model lands in [15.9 MB, 16 MB]; lower targets are honoured
# ------------------------------------------------------------------------------------------------------------


def log_fields(log_path, prefix):
    """key:value fields of the last log line starting with `prefix` (a value's trailing ':' dropped), and the
    whole line as "text"."""
    lines = [l for l in open(log_path).read().splitlines() if l.startswith(prefix)]
    assert lines, f"no {prefix} line in {log_path}"
    fields = dict(f.rstrip(":").split(":", 1) for f in lines[-1].split()[1:] if ":" in f.rstrip(":"))
    return dict(fields, text=lines[-1])


@torch.no_grad()
def perturb_like_trained(model, seed, std=0.02):
    """Random init plus heavy-tailed noise standing in for training: Student-t (5 dof) entries with lognormal
    per-row scales, so the code histograms have trained-like tails.  Not trained weights."""
    torch.manual_seed(seed)
    t = torch.distributions.StudentT(5.0)
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for p in tg.matrix_params(model) + tables:
        p.add_(t.sample(p.shape) * torch.exp(0.3 * torch.randn(*p.shape[:-1], 1)) * std)


def calib_hp(hp, data_path, batches=2):
    """Same model and quantization settings; Hessians from a couple of small training batches."""
    return dataclasses.replace(hp, data_path=str(data_path), tokenizer_path=str(TOKENIZER_1024), train_seq_len=1024,
                               train_batch_tokens=2048, grad_accum_steps=1, gptq_calib_batches=batches)


def pack_full_size(hp, data_path, tmp_path):
    """A full-size model with trained-like weights through quantize_model; prints and returns what it did."""
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    perturb_like_trained(model, seed=1)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    hessians = tg.collect_hessians(model, calib_hp(hp, data_path), rt)
    t0 = time.perf_counter()
    blob = tg.quantize_model(model, hessians, hp, rt, CODE_BYTES)
    seconds = time.perf_counter() - t0
    alloc = log_fields(rt.log_path, "quant:sdclip")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{hp.preset} full size ({n_params} params): artifact {len(blob)} + code {CODE_BYTES} = "
          f"{len(blob) + CODE_BYTES} bytes; allocation {alloc}; quantize_model {seconds:.1f}s on CPU "
          f"({torch.get_num_threads()} threads)")
    log = open(rt.log_path).read()
    # one sizing, one brotli-11 pass
    assert "missed the budget" not in log and log.count("quant:sdclip factor:") == 1
    return model, hessians, blob, n_params


@pytest.mark.slow
def test_seed_size_model_lands_just_under_16mb(tiny_data, tmp_path):
    hp = tg.Hyperparameters()  # the seed config: 11 x 512, SDClip int6, TARGET_BYTES=16,000,000
    assert hp.target_bytes == 16_000_000
    model, hessians, blob, n_params = pack_full_size(hp, tiny_data, tmp_path)
    assert 30_000_000 < n_params < 31_500_000
    assert 15_900_000 <= len(blob) + CODE_BYTES <= 16_000_000
    assert "quant:warning" not in (tmp_path / "log.txt").read_text()  # measured factor 0.715: inside the bounds
    loaded = tg.load_artifact(blob, hp, torch.device("cpu"))
    rel = []  # relative layer-output error trace(D H D^T) / trace(W H W^T) of every matrix
    for bank, idx, key, _ in tg.bank_matrices(hp.num_layers):
        W, W_hat, H = getattr(model, bank)[idx].detach(), getattr(loaded, bank)[idx].detach(), hessians[key]
        D = W_hat - W
        rel.append(float(((D @ H) * D).sum() / ((W @ H) * W).sum()))
    print(f"relative output error per matrix: {min(rel):.4f}..{max(rel):.4f}")
    assert max(rel) < 0.008  # measured 0.0015..0.0050 (the former mixed mode: 0.0004..0.0103)


@pytest.mark.slow
def test_record_size_model_fits_16mb(tiny_data, tmp_path):
    """PRESET=record at full size (35.9 M parameters, an 8192 x 512 tied embedding) through today's packer."""
    hp = tg.Hyperparameters.from_env({"PRESET": "record"})
    model, _, blob, n_params = pack_full_size(hp, tiny_data, tmp_path)
    assert 35_800_000 < n_params < 36_000_000
    assert 15_900_000 <= len(blob) + CODE_BYTES <= 16_000_000
    loaded = tg.load_artifact(blob, hp, torch.device("cpu"))
    assert loaded.looping and torch.allclose(loaded.lane_resid, model.lane_resid.detach(), atol=1e-3)


def test_impossible_target_is_a_config_error(trained):
    hp = dataclasses.replace(trained.hp, target_bytes=60_000)
    with pytest.raises(tg.ConfigError, match="the model does not fit: .* at the coarsest SDClip codes > "):
        tg.quantize_model(trained.model(), trained.hessians, hp, trained.rt, 0)


# ------------------------------------------------------------------------------------------------------------
# 4-5. the script end to end: roundtrip eval, snapshot
# ------------------------------------------------------------------------------------------------------------


class Runs:
    """A: a tiny run with SNAPSHOT=logs/snapshot.pt (absent: it is written after the Hessians and the run goes
    on).  C: the same SNAPSHOT (present: loaded, nothing trained)."""

    def __init__(self, data_path, cwd):
        self.cwd = cwd
        env = {k: v for k, v in os.environ.items() if k not in TINY_ENV}
        env.update(env_for(data_path, TTT_ENABLED="0"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                   SNAPSHOT="logs/snapshot.pt")
        self.env = env
        self.snapshot = cwd / "logs" / "snapshot.pt"
        self.rc_a, self.out_a = run_script(SCRIPT, dict(env, RUN_ID="full"), cwd)
        self.rc_c, self.out_c = run_script(SCRIPT, dict(env, RUN_ID="resume"), cwd)

    def artifact(self, run_id):
        return self.cwd / "logs" / f"{run_id}_model.int6.ptz"


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    return Runs(tiny_data, tmp_path_factory.mktemp("quant_runs"))


@pytest.mark.slow
def test_roundtrip_close_to_prequant_and_equal_to_eval_of_written_artifact(runs, one_thread):
    assert runs.rc_a == 0, runs.out_a[-3000:]
    _, pre = final_metric(runs.out_a, "final_prequant_exact")
    loss, rt_bpb = final_metric(runs.out_a, "final_int6_roundtrip_exact")
    print(f"\ntiny run: prequant {pre:.6f} roundtrip {rt_bpb:.6f} gap {rt_bpb - pre:+.6f}")
    assert abs(rt_bpb - pre) < 0.01
    path = runs.artifact("full")
    data = path.read_bytes()
    assert f"Serialized model int6+brotli: {len(data)} bytes" in runs.out_a
    hp = tg.Hyperparameters.from_env(env_for(runs.env["DATA_PATH"], TTT_ENABLED="0"))
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(runs.cwd / "check.txt"))
    tables = tg.build_byte_tables(tg.load_tokenizer(hp), hp.vocab_size)
    model = tg.load_artifact(data, hp, torch.device("cpu"))
    my_loss, my_bpb = tg.eval_full(model, tg.load_val_tokens(hp), hp, rt, tables)
    assert abs(my_bpb - rt_bpb) < 1e-8 and abs(my_loss - loss) < 1e-8, (my_bpb, rt_bpb)


@pytest.mark.slow
def test_snapshot_written_then_loaded_reproduces_the_run(runs):
    assert runs.rc_a == 0, runs.out_a[-3000:]
    assert "snapshot:saved logs/snapshot.pt" in runs.out_a and "snapshot:loaded" not in runs.out_a
    assert "training_done" in runs.out_a and runs.artifact("full").exists()  # written, and the run went on
    snap = torch.load(runs.snapshot, map_location="cpu")
    hp = tg.Hyperparameters.from_env(env_for(runs.env["DATA_PATH"]))
    assert set(snap["model"]) == set(tg.GPT(hp).state_dict())
    assert set(snap["hessians"]) == {f"{k}.{i}" for k in ("attn_in", "attn_out", "mlp_in", "mlp_hidden")
                                     for i in range(hp.num_layers)} | {"head_in"}  # the tied head's input
    assert runs.rc_c == 0, runs.out_c[-3000:]
    assert "snapshot:loaded logs/snapshot.pt" in runs.out_c and "training_done" not in runs.out_c
    assert "snapshot:saved" not in runs.out_c and "gptq:hessians" not in runs.out_c
    for name in ("final_prequant_exact", "final_int6_roundtrip_exact", "final_int6_sliding_window_exact"):
        assert final_metric(runs.out_c, name) == final_metric(runs.out_a, name), name
    assert runs.artifact("resume").read_bytes() == runs.artifact("full").read_bytes()


# ------------------------------------------------------------------------------------------------------------
# Benchmark: quantization gap of SDClip rounding, GPTQ, and GPTQ with AWQ-lite at one byte budget
# ------------------------------------------------------------------------------------------------------------


def test_benchmark_report(trained, monkeypatch):
    pre = trained.bpb(trained.model())
    hp = dataclasses.replace(trained.hp, embed_bits=7)
    target = int(0.6 * len(tg.quantize_model(trained.model(), trained.hessians, hp, trained.rt, 0)))
    hp = dataclasses.replace(hp, target_bytes=target)
    results = {}
    for label, rtn, awq in (("sdclip rounding", True, 0), ("sdclip gptq", False, 0), ("gptq + awq-lite", False, 1)):
        with monkeypatch.context() as m:
            if rtn:
                m.setattr(tg, "gptq_quantize", lambda W, H, bits, k, hi=None: tg.quantize_rtn(W, bits, k, hi))
            run_hp = dataclasses.replace(hp, awq_groups=awq)
            blob = tg.quantize_model(trained.model(), trained.hessians, run_hp, trained.rt, 0)
        results[label] = (len(blob), trained.bpb(tg.load_artifact(blob, run_hp, torch.device("cpu"))) - pre)
    print(f"\nquantization gap on the small trained model at {target} bytes (prequant {pre:.5f} bpb):")
    for label, (size, gap) in results.items():
        print(f"  {label:20s} {size:8d} bytes  gap {gap:+.5f} bpb")
    assert all(0.97 * target <= size <= target and abs(gap) < 0.05 for size, gap in results.values())


def test_all_zero_rows_quantize_to_zero_codes_with_a_finite_scale(monkeypatch):
    monkeypatch.setattr(tg, "GPTQ_BLOCK_SIZE", 8)  # several lazy-update blocks
    W = torch.randn(6, 32)
    W[2] = 0.0
    H = torch.eye(32) + 0.1
    for q, scale in (tg.quantize_rtn(W, 5), tg.gptq_quantize(W, H, 5, 12.0)):
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert (q[2] == 0).all()
        assert q.abs().max() <= tg.qmax_of(5)


def test_lqer_asymmetric_factors_are_the_records_codes():
    """A at int2 in [-2, 1] with one scale max|A| / 1.5; B at int4 in [-8, 7], one scale max|group| / 7.5 per
    group of LQER_GROUP = 64: the record's packing, here through the artifact's own format (which must accept
    -2 and -8)."""
    torch.manual_seed(0)
    W = torch.randn(64, 96)
    hp = tg.Hyperparameters(lqer_rank=2)
    assert tg.LQER_GROUP == 64
    entries = tg.lqer_entries([tg.Target("w", W, "k", "attn", 6)], [torch.zeros_like(W)], hp)
    (_, _, a_bits, a_shape, qa, sa), (_, _, b_bits, b_shape, qb, sb) = entries
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    A, B = (U[:, :2] * S[:2]).T.reshape(1, -1), Vh[:2].reshape(-1, 64)
    assert (a_bits, a_shape, b_bits, b_shape) == (2, (1, 128), 4, (3, 64))
    assert torch.allclose(sa, (A.abs().amax() / 1.5).half().float(), rtol=0) and sa.numel() == 1
    assert torch.allclose(sb, (B.abs().amax(dim=1) / 7.5).half().float(), rtol=0)
    assert torch.equal(qa.float(), (A / sa).round().clamp(-2, 1))
    assert torch.equal(qb.float(), (B / sb[:, None]).round().clamp(-8, 7))
    state = tg.deserialize(tg.serialize(entries))
    assert torch.equal(state["w.lqA"], qa.float() * sa[:, None]) and torch.equal(state["w.lqB"], qb * sb[:, None])
    edge = tg.Entry("e", tg.KIND_INT, 2, (1, 2), torch.tensor([[-2, 1]], dtype=torch.int8), torch.ones(1))
    assert tg.deserialize(tg.serialize([edge]))["e"].tolist() == [[-2.0, 1.0]]  # int2's full range is legal
    with pytest.raises(ValueError, match="code out of range in e"):
        tg.deserialize(tg.serialize([edge._replace(codes=edge.codes - 1)]))


def test_looped_layers_hessians_are_a_mean_per_pass(tiny_data, tmp_path):
    """A looped layer's matrices see every pass (3 with NUM_LOOPS=2): their H is the mean of x^T x per input row over
    all passes, so the AWQ saliency sqrt(diag H) compares with other layers' as a single pass would.  The q/k/v and
    MLP inputs are RMS-normed, so each row's |x|^2 is the same in every pass: the trace per layer equals the
    single-pass (loops off) trace to float error, instead of 3x it on layers 1-2."""
    hp = tg.Hyperparameters.from_env({"PRESET": "record", "NUM_LAYERS": "4", "LOOP_START": "1", "LOOP_END": "2",
                                      "PARALLEL_START": "3", "MODEL_DIM": "64", "NUM_HEADS": "4",
                                      "NUM_KV_HEADS": "2", "VOCAB_SIZE": "1024"})
    torch.manual_seed(0)
    model = tg.GPT(hp)
    rt = tg.Runtime(0, 1, torch.device("cpu"), str(tmp_path / "log.txt"))
    traces = {}
    for looping in (True, False):
        model.looping = looping
        H = tg.collect_hessians(model, calib_hp(hp, tiny_data, batches=1), rt)
        traces[looping] = {k: float(H[k].trace()) for k in H if k.split(".")[0] in ("attn_in", "mlp_in")}
    for key, single in traces[False].items():
        assert traces[True][key] == pytest.approx(single, rel=1e-4), key
