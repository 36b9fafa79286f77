"""tools/gpu_check.sh / tools/gpu_check.py: the --cpu run (the GPU check's own code path at a tiny size) yields every
key other tools read, with sane positive numbers; a part that fails, hangs or has a bad setting is recorded without
costing the others; the phased-TTT schedule replay and the synthetic data are right.  No timing thresholds."""
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402


def check_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_FAIL", "RANK", "WORLD_SIZE")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_cpu")
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu", str(out)], env=check_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=420)
    return proc, out


def positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_cpu_run_writes_every_key(cpu_report):
    proc, out = cpu_report
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["mode"] == "cpu"
    assert isinstance(report["device"], str) and report["device"] != "unknown" and report["torch"]
    assert set(report["parts"]) == set(gpu_check.ALL_PARTS)
    assert all(p["ok"] and p["error"] is None for p in report["parts"].values()), report["parts"]
    for name in gpu_check.PRESET_NAMES:
        p = report["presets"][name]
        train, ev, quant = p["train"], p["eval"], p["quant"]
        for key in ("tokens_per_s", "ms_per_step", "peak_mem_gib", "flops_per_token", "newton_schulz_ms_per_step",
                    "newton_schulz_ms_per_rank_8gpu", "hessian_s", "projected_steps_600s_8xh100"):
            assert positive(train[key]), (name, key, train.get(key))
        assert isinstance(train["attention"], str) and train["attention"]
        assert train["grad_accum_steps"] == 8 and train["world_size"] == 1
        assert train["reference_steps"] == {"seed": 6291, "record": 4931}[name]
        assert train["dynamo"]["graph_breaks"] >= 0 and train["dynamo"]["recompiles"] >= 0
        for key in ("sliding_tokens_per_s", "roundtrip_tokens_per_s", "ttt_projected_s_8xh100",
                    "eval_projected_total_s_8xh100", "sliding_projected_s_8xh100"):
            assert positive(ev[key]), (name, key, ev.get(key))
        assert isinstance(ev["within_600s"], bool)
        for mode in ("ttt_chunk_muon", "ttt_chunk_sgd"):
            assert positive(ev[mode]["tokens_per_s"]) and positive(ev[mode]["projected_s_8xh100"])
            assert ev[mode]["chunks_adapted"] == ev[mode]["chunks"] - 1  # the budget guard never cut in
        phased = ev["ttt_phased"]
        assert phased["schedule_check"] == "ok"  # doc_steps() matches the steps the trainer took
        assert not phased["interrupted"] and phased["batches_completed"] == phased["batches"]
        assert positive(phased["row_tokens_per_s"]) and positive(phased["projected_s_8xh100"])
        assert phased["step_fit"]["steps"] > 0 and positive(phased["step_fit"]["b_s_per_row_token"])
        assert positive(phased["global_tokens_per_s"]) and phased["global_phases_run"] >= 1
        own = "ttt_phased" if name == "record" else "ttt_chunk_muon"  # each preset's own TTT_MODE
        assert ev["ttt_projected_from"] == own and ev["ttt_projected_s_8xh100"] == ev[own]["projected_s_8xh100"]
        assert positive(quant["quantize_s"]) and positive(quant["artifact_bytes"]) and quant["fits"]
        assert positive(quant["load_artifact_s"]) and quant["weights"].startswith("after")
        awq = quant["awq"]
        assert ".awq" in awq["group"] and 0 < awq["max_code"] <= 127 and positive(awq["gptq_s"])
    record = report["presets"]["record"]["train"]
    assert positive(record["ms_per_step_pre_loop"]) and positive(record["ms_per_step_post_loop"])
    assert record["virtual_layers_post_loop"] > record["virtual_layers_pre_loop"]  # the loops really switched on
    assert record["flops_per_token_post_loop"] > record["flops_per_token_pre_loop"]
    f = 0.35
    assert record["ms_per_step"] == pytest.approx(
        1 / (f / record["ms_per_step_pre_loop"] + (1 - f) / record["ms_per_step_post_loop"]))
    table = (out / "gpu_check.md").read_text()
    assert "| metric | seed | record |" in table and "projected steps in 600 s" in table
    assert "| record.phased | ok |" in table
    assert (out / "logs" / "record.train.log").exists()


@pytest.mark.slow
def test_failing_hanging_and_misconfigured_parts_do_not_stop_the_rest(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--cpu", "--out", str(out),
           "--parts", "info,seed.eval,seed.quant,record.quant", "--part-timeout", "info=3",
           "--set", "record:NUM_HEADS=5"]  # a bad setting for one preset only
    proc = subprocess.run(cmd, env=check_env(GPU_CHECK_FAIL="info:hang,seed.eval"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]  # JSON written, some part failed
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert not report["ok"] and list(parts) == ["info", "seed.eval", "seed.quant", "record.quant"]
    assert parts["info"]["timed_out"] and "time limit" in parts["info"]["error"]
    assert not parts["seed.eval"]["timed_out"] and "forced failure" in parts["seed.eval"]["error"]
    assert "NUM_HEADS" in parts["record.quant"]["error"] and not parts["record.quant"]["ok"]
    assert "forced failure" in report["presets"]["seed"]["eval"]["error"]
    assert "NUM_HEADS" in report["presets"]["record"]["quant"]["error"]
    assert parts["seed.quant"]["ok"] and positive(report["presets"]["seed"]["quant"]["artifact_bytes"])
    assert report["device"] == "unknown"  # info never finished; the rest still reported
    assert "| info | timed out" in (out / "gpu_check.md").read_text()


def hp_stub(**kw):
    base = dict(ttt_doc_chunk=48, eval_seq_len=2048, ttt_doc_batch=4)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_legacy_doc_steps_follow_the_old_window_rule():
    hp = hp_stub()
    assert gpu_check.legacy_doc_steps([100, 30], hp) == [(4, 64), (4, 128), (4, 128)]  # windows 48, 96, 100
    assert gpu_check.legacy_doc_steps([48], hp) == [(4, 64)]
    steps = gpu_check.legacy_doc_steps([5000], hp)
    assert len(steps) == math.ceil(5000 / 48) and steps[-1] == (4, 2048) and steps == sorted(steps)
    assert gpu_check.legacy_doc_steps([100], hp_stub(eval_seq_len=64)) == [(4, 64)] * 3


def test_phased_projection_shares_the_cost_but_not_below_the_largest_batch():
    def steps_of(lengths):  # one step per document, rows = documents, length = the longest
        return [(len(lengths), max(lengths))] * len(lengths)

    lengths = [100, 10, 20, 30, 40, 50, 60, 70]  # batches of 4 in length order: [10..40], [50..100]
    per_rank, largest, n_steps, row_tokens = gpu_check.phased_projection(lengths, 4, steps_of, lambda r, n: r * n, 2)
    assert (largest, n_steps, row_tokens) == (4 * 4 * 100, 8, 4 * 4 * 40 + 4 * 4 * 100)
    assert per_rank == max(row_tokens / 2, largest) == 1600
    assert gpu_check.phased_projection(lengths, 4, steps_of, lambda r, n: r * n, 1)[0] == row_tokens


def test_step_fit_recovers_a_linear_cost():
    samples = [(r, n, 0.01 + 2e-6 * r * n) for r in (8, 16, 64) for n in (64, 512, 2048)]
    step_s, fit = gpu_check.fit_step_seconds(samples)
    assert fit["model"].startswith("a + b*RT") and fit["median_rel_error"] < 1e-6
    assert step_s(32, 1024) == pytest.approx(0.01 + 2e-6 * 32 * 1024)
    step_s, fit = gpu_check.fit_step_seconds([(4, 64, 0.5)])  # one shape: no intercept to fit
    assert fit["model"] == "b*RT" and step_s(4, 128) == pytest.approx(1.0)


def test_synthetic_stream_is_bos_separated_documents():
    lens = gpu_check.doc_lengths(1000, 1_000_000, 1.0, seed=3)
    assert len(lens) == 1000 and lens.min() >= 8 and abs(int(lens.sum()) - 1_000_000) < 5_000
    assert gpu_check.doc_lengths(50, 50_000, 1.0, seed=3, cap=512).max() <= 512
    tokens = gpu_check.synthetic_stream(20, 100, 1.0, 8192, seed=5)
    assert tokens.dtype == np.uint16 and tokens[0] == 1 and tokens.max() < 8192
    assert (tokens == 1).sum() == 20 and (tokens == 0).sum() == 0


def test_tokenizer_fallback_trains_one_of_the_right_size(tmp_path):
    path, source = gpu_check.find_tokenizer(1024, tmp_path / "tok", dirs=[tmp_path / "nowhere"])
    import sentencepiece as spm
    assert "synthetic" in source and spm.SentencePieceProcessor(model_file=path).vocab_size() == 1024
