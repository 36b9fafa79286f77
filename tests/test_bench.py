"""tools/bench.py: the timing helper, the FLOPs formula, and a CPU smoke run of every mode (no timing thresholds)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bench  # noqa: E402
import train_gpt_human as tg  # noqa: E402


def test_timed_returns_median_and_syncs_around_every_call(monkeypatch):
    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # durations 3, 1, 2 -> median 2
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    events = []
    median = bench.timed(lambda: events.append("fn"), 3, lambda: events.append("sync"),
                         setup=lambda: events.append("setup"))
    assert median == 2.0
    assert events == ["setup", "sync", "fn", "sync"] * 3


def tiny_hp():
    return bench.load_config("cpu")


def test_flops_formula_counts_every_matmul_weight():
    hp = tiny_hp()
    assert (hp.num_layers, hp.model_dim, hp.train_seq_len) == (2, 64, 128)
    model = tg.GPT(hp)
    L, d, V, T = hp.num_layers, hp.model_dim, hp.vocab_size, hp.train_seq_len
    kv = hp.num_kv_heads * d // hp.num_heads
    mlp = int(hp.mlp_mult * d)
    per_layer = 2 * d * d + 2 * kv * d + 2 * mlp * d  # q, o; k, v; up, down
    n_matmul = L * per_layer + V * d + d * 4 * hp.engram_dim + kv * hp.ve_dim
    assert bench.matmul_params(model) == n_matmul == 2 * 28672 + 65536 + 8192 + 512
    assert bench.flops_per_token(model, hp) == 6 * n_matmul + 12 * L * T * d


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--steps", "0"])
    args = bench.parse_args(["--device", "cpu"])
    assert (args.steps, args.repeats, args.warmup) == (10, 3, 2)


def test_cpu_smoke_all_modes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in bench.CPU_TINY and k not in ("DEVICE", "DATA_PATH")}
    env.update(OMP_NUM_THREADS="1", GPTQ_CALIB_BATCHES="2")
    out = tmp_path / "tmp.json"
    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "--device", "cpu", "--mode", "all", "--steps", "2",
           "--warmup", "1", "--repeats", "1", "--eval-tokens", "512", "--ttt-chunks", "2", "--synthetic",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ms/step" in proc.stdout and "TTT muon tokens/s" in proc.stdout and "artifact bytes" in proc.stdout
    r = json.loads(out.read_text())

    d = r["device"]
    assert d["type"] == "cpu" and d["attention"] == "sdpa" and d["peak_tflops"] is None
    assert d["torch"] == __import__("torch").__version__ and d["threads"] == 1
    assert r["data"] == "synthetic" and r["modes"] == ["train", "eval", "compress"]
    assert r["config"]["num_layers"] == 2 and r["config"]["model_dim"] == 64

    t = r["train"]
    for key in ("ms_per_step", "tokens_per_s", "fwd_bwd_ms", "optimizer_ms", "averager_ms", "peak_memory_mib",
                "flops_per_token", "warmup_s"):
        assert t[key] > 0, key
    assert t["mfu"] is None and t["timed_steps"] == 2 and t["tokens_per_step"] == 2048
    assert t["tokens_per_s"] * t["ms_per_step"] / 1000 == pytest.approx(2048, rel=1e-9)
    hp = tiny_hp()
    assert t["flops_per_token"] == bench.flops_per_token(tg.GPT(hp), hp)
    # uniform random tokens: a few steps cannot take the loss far from the entropy ln(V)
    assert abs(t["last_train_loss"] - math.log(1024)) < 0.5
    ns = t["newton_schulz"]
    assert [b["shape"] for b in ns["banks"]] == [[4, 64, 64], [2, 128, 64], [2, 64, 128], [4, 32, 64], [1, 64, 128],
                                                  [1, 32, 16]]
    assert [b["shard_8gpu_shape"][0] for b in ns["banks"]] == [1] * 6
    assert all(b["ms"] > 0 and b["shard_8gpu_ms"] > 0 for b in ns["banks"])
    assert ns["total_ms"] == pytest.approx(sum(b["ms"] for b in ns["banks"]))

    e = r["eval"]
    assert e["sliding"]["tokens"] == 512
    for key, tokens in (("sliding", 512), ("ttt_muon", 4096), ("ttt_sgd", 4096)):
        assert e[key]["tokens"] == tokens and e[key]["tokens_per_s"] > 0 and e[key]["seconds"] > 0
        assert e[key]["projected_full_val_8gpu_s"] == pytest.approx(62_021_632 / (e[key]["tokens_per_s"] * 8))
    for key in ("ttt_muon", "ttt_sgd"):
        assert (e[key]["chunks"], e[key]["chunks_adapted"]) == (2, 1)  # the last chunk is never trained on

    c = r["compress"]
    assert c["error"] is None and c["matrices"] == 12 and c["gptq_cholesky_fallbacks"] == 0
    for key in ("hessian_s", "gptq_s", "quantize_model_s", "plan_s", "prune_and_pack_s", "artifact_bytes",
                "code_bytes", "peak_memory_mib"):
        assert c[key] > 0, key
    assert c["plan_s"] + c["prune_and_pack_s"] <= c["quantize_model_s"]
    assert c["total_bytes"] == c["artifact_bytes"] + c["code_bytes"] <= c["target_bytes"] == 2_000_000
    assert c["compressor"] == ("brotli" if tg.brotli is not None else "lzma")
