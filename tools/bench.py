#!/usr/bin/env python3
"""Throughput benchmark for train_gpt_human.py (a development tool, not part of the submitted artifact).

Measures, on one device, with the trainer's own code:

  train     warm-up, then --steps timed optimizer steps of the exact training step (train_gpt_human.train_step
            with build_optimizers, plus the WeightAverager update): ms/step, tokens/s, model FLOPs per token,
            fraction of the device's bf16 peak, peak memory, and the forward+backward / optimizer split, with
            Newton-Schulz (muon_update on every Muon bank shape) timed on its own.
  eval      sliding-window tokens/s (eval_sliding), score-first TTT tokens/s for the muon and sgd optimizers
            (eval_ttt on a slice of a few chunks), and the projected time for the full 62,021,632-token
            validation split on 8 GPUs, by linear scaling: tokens / (tokens_per_s * 8).
  compress  Hessian collection (collect_hessians), GPTQ over every bank matrix (gptq_quantize), and the whole
            quantize_model (SDClip sizing + GPTQ + pruning search + brotli), with the artifact bytes.

Model FLOPs per training token (PaLM-style accounting, stated in the JSON as well):
    6 * N_matmul + 12 * L * T * d
N_matmul counts every weight used in a matmul: the four banks (q, k, v, o, mlp up/down of every layer), the
tied embedding as the output head (V x d), EngramLite's projection and the value-embedding projection; table
lookups are not matmuls.  12*L*T*d is the attention score and value product (2 matmuls x 2 FLOPs x 3 for
forward+backward) over the full T x T matrix, not halved for the causal mask, T = TRAIN_SEQ_LEN.

Configuration: Hyperparameters.from_env() reads the environment exactly as the trainer does, so any env
config works.  On CUDA the default is the seed config; `--device cpu` starts from a tiny config (2 layers,
d=64) that env vars can still override.  Tokens come from DATA_PATH shards when present, else (or with
--synthetic) from uniform random tokens written to temporary shards.

Times: each measured call is bracketed by torch.cuda.synchronize() on CUDA, warm-up calls are excluded, and
the figure is the median of the repeats.  torch.compile is used on CUDA like the trainer (COMPILE env).

    python3 tools/bench.py --device cpu --mode all --out bench.json
    COMPILE=1 python3 tools/bench.py --mode train --steps 20 --out h100.json
"""
import argparse
import dataclasses
import datetime
import glob
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt_human as tg  # noqa: E402

VAL_TOKENS_FULL = 62_021_632  # tokens in the challenge's validation split
EVAL_GPUS = 8

# The CPU starting point (like the test suite's TINY config); env vars override it.
CPU_TINY = {
    "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "2048", "GRAD_ACCUM_STEPS": "1",
    "EVAL_STRIDE": "64", "EVAL_BATCH_SEQS": "16", "ENGRAM_BUCKETS": "256", "VE_DIM": "16",
    "GPTQ_CALIB_BATCHES": "4", "TTT_CHUNK_TOKENS": "2048", "TTT_BATCH_SEQS": "8", "TARGET_BYTES": "2000000",
    "COMPILE": "0",
}

# Per device: warm-up steps, timed steps, repeats, sliding-eval predictions, TTT chunks.
DEFAULTS = {
    "cpu": {"warmup": 2, "steps": 10, "repeats": 3, "eval_tokens": 16384, "ttt_chunks": 4},
    "cuda": {"warmup": 5, "steps": 20, "repeats": 3, "eval_tokens": 262144, "ttt_chunks": 4},
}


def timed(fn, repeats, sync, setup=None):
    """Median wall-clock seconds of `repeats` calls of fn().  sync() runs before and after every call, so work
    queued on the device is counted (torch.cuda.synchronize on CUDA, a no-op on CPU); setup(), when given,
    runs before each call and is not timed."""
    times = []
    for _ in range(max(1, repeats)):
        if setup is not None:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class QuietRuntime(tg.Runtime):
    """The trainer's Runtime with its log lines sent to the log file only (stdout carries the table)."""

    def log(self, msg):
        with open(self.log_path, "a") as f:
            f.write(msg + "\n")


# ----------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise tg.ConfigError("--device cuda but torch sees no GPU; use --device cpu")
    return name


def load_config(device):
    env = dict(CPU_TINY) if device == "cpu" else {}
    env.update(os.environ)
    env["DEVICE"] = device
    return tg.Hyperparameters.from_env(env)


def compile_enabled(hp, rt):
    return bool(hp.compile if hp.compile >= 0 else rt.is_cuda)


def device_info(rt, args, hp):
    if rt.is_cuda:
        name = torch.cuda.get_device_name(rt.device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {
        "type": rt.device.type, "name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "attention": tg.ATTENTION["kernel"], "doc_isolation": hp.doc_isolation,
        "threads": torch.get_num_threads(), "peak_tflops": args.peak_tflops if rt.is_cuda else None,
        "python": platform.python_version(), "brotli": tg.brotli is not None,
    }


def write_shard(path, tokens):
    header = np.zeros(tg.HEADER_INTS, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def prepare_data(hp, args, tmpdir, val_needed):
    """Returns (hp with a usable DATA_PATH, validation tokens, byte LUTs, description)."""
    real = not args.synthetic and bool(glob.glob(os.path.join(hp.data_path, "fineweb_train_*.bin")))
    gen = torch.Generator().manual_seed(hp.seed)
    if real:
        val = tg.load_val_tokens(hp)
        try:
            luts = tg.build_byte_luts(tg.load_tokenizer(hp), hp.vocab_size)
        except tg.ConfigError:
            luts = synthetic_luts(hp.vocab_size)
        return hp, val, luts, f"real:{hp.data_path}"
    n_train = max(4 * hp.train_batch_tokens, 1 << 16) + 1
    write_shard(os.path.join(tmpdir, "fineweb_train_000000.bin"),
                torch.randint(0, hp.vocab_size, (n_train,), generator=gen).numpy())
    val = torch.randint(0, hp.vocab_size, (val_needed,), generator=gen)
    why = "" if args.synthetic else f" (no train shards at {hp.data_path})"
    return dataclasses.replace(hp, data_path=tmpdir), val, synthetic_luts(hp.vocab_size), "synthetic" + why


def synthetic_luts(vocab_size):
    """Byte counts for synthetic tokens: 1..4 bytes, no space markers, no boundary tokens."""
    base = torch.arange(vocab_size) % 4 + 1
    return base, torch.zeros(vocab_size, dtype=torch.bool), torch.zeros(vocab_size, dtype=torch.bool)


def peak_memory_mib(rt):
    if rt.is_cuda:
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_memory(rt):
    if rt.is_cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)


# ----------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------

FLOPS_FORMULA = ("6*N_matmul + 12*L*T*d; N_matmul = qo+kv+mlp_up+mlp_down banks + tied head (V*d) + "
                 "engram.proj + ve_proj; attention over the full TxT scores (not halved for causality), "
                 "T=TRAIN_SEQ_LEN")


def matmul_params(model):
    return sum(p.numel() for p in tg.matrix_params(model)) + model.tok_emb.weight.numel()


def flops_per_token(model, hp):
    return 6 * matmul_params(model) + 12 * hp.num_layers * hp.train_seq_len * hp.model_dim


# ----------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------


def bench_newton_schulz(opt, hp, rt, repeats, sync):
    """muon_update on every Muon bank shape: the whole bank (1 GPU) and one rank's shard on 8 GPUs."""
    rows, total, total_8 = [], 0.0, 0.0
    for p in opt.muon.params:
        full = opt.muon._padded(p.detach())
        G = torch.randn(full.shape, device=rt.device, dtype=torch.float32)
        per_rank = -(-G.size(0) // EVAL_GPUS)
        G8 = G[:per_rank].contiguous()
        tg.muon_update(G, hp.muon_backend_steps, hp.muon_variant)  # warm-up
        tg.muon_update(G8, hp.muon_backend_steps, hp.muon_variant)
        ms = 1000 * timed(lambda: tg.muon_update(G, hp.muon_backend_steps, hp.muon_variant), repeats, sync)
        ms8 = 1000 * timed(lambda: tg.muon_update(G8, hp.muon_backend_steps, hp.muon_variant), repeats, sync)
        rows.append({"shape": list(G.shape), "ms": ms, "shard_8gpu_shape": list(G8.shape), "shard_8gpu_ms": ms8})
        total, total_8 = total + ms, total_8 + ms8
    return {"banks": rows, "total_ms": total, "per_rank_8gpu_ms": total_8}


def bench_train(hp, rt, args, sync):
    tg.BankLinear.qat_enabled = bool(args.qat)
    if args.qat:
        tg.BankLinear.qat_bits = hp.qat_bits
        tg.BankLinear.qat_alpha = torch.full((), 8.0, device=rt.device)
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp).to(rt.device)
    step_model = torch.compile(model, dynamic=False) if compile_enabled(hp, rt) else model
    opt = tg.build_optimizers(model, hp, 1)
    averager = tg.WeightAverager(model, hp)
    accum = tg.grad_accum_steps(hp, 1)
    loader = tg.DistributedTokenLoader(tg.shard_files(hp.data_path, "train"), hp, 0, 1, rt.device)
    counter = {"step": 0, "loss": None}

    def full_step():  # exactly what train() does per step, less logging and the LR/QAT schedule
        counter["loss"] = tg.train_step(step_model, opt, loader, hp, rt, accum, 1.0)
        averager.update(model, counter["step"], 1.0)
        counter["step"] += 1

    def forward_backward():  # the accumulation loop of train_step, without opt.step
        for _ in range(accum):
            x, y, docs = loader.next_batch(accum)
            with rt.autocast():
                loss = step_model(x, y, docs=docs)
            (loss / accum).backward()

    reset_peak_memory(rt)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        full_step()
    sync()
    warmup_s = time.perf_counter() - t0
    step_s = timed(full_step, args.steps, sync)
    loss = float(counter["loss"])
    fb, op, av = [], [], []
    for _ in range(args.steps):
        fb.append(timed(forward_backward, 1, sync))
        op.append(timed(lambda: opt.step(1.0), 1, sync))
        av.append(timed(lambda: averager.update(model, counter["step"], 1.0), 1, sync))
        counter["step"] += 1
    peak = peak_memory_mib(rt)
    ns = bench_newton_schulz(opt, hp, rt, args.repeats, sync)
    tokens_per_s = hp.train_batch_tokens / step_s
    fpt = flops_per_token(model, hp)
    mfu = fpt * tokens_per_s / (args.peak_tflops * 1e12) if rt.is_cuda else None
    tg.BankLinear.qat_enabled = False
    del opt, averager
    result = {
        "warmup_steps": args.warmup, "timed_steps": args.steps, "grad_accum_steps": accum,
        "tokens_per_step": hp.train_batch_tokens, "compile": compile_enabled(hp, rt), "qat": bool(args.qat),
        "warmup_s": warmup_s, "ms_per_step": 1000 * step_s, "tokens_per_s": tokens_per_s,
        "ms_per_step_8gpu_linear": 1000 * step_s / EVAL_GPUS,
        "params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul_params(model),
        "flops_per_token": fpt, "flops_formula": FLOPS_FORMULA, "mfu": mfu,
        "peak_memory_mib": peak, "peak_memory_kind": "cuda max_memory_allocated" if rt.is_cuda else "process max RSS",
        "fwd_bwd_ms": 1000 * statistics.median(fb), "optimizer_ms": 1000 * statistics.median(op),
        "averager_ms": 1000 * statistics.median(av), "newton_schulz": ns, "last_train_loss": loss,
    }
    return model, result


def bench_eval(model, val, hp, rt, luts, args, sync):
    scorer = torch.compile(model, dynamic=False) if compile_enabled(hp, rt) else model
    out = {}
    n = min(args.eval_tokens, len(val) - 1)
    toks = val[:n + 1]
    reset_peak_memory(rt)
    tg.eval_sliding(scorer, toks, hp, rt, luts)  # warm-up (compiles every window shape)
    s = timed(lambda: tg.eval_sliding(scorer, toks, hp, rt, luts), args.repeats, sync)
    out["sliding"] = {"tokens": n, "stride": hp.eval_stride, "seq_len": hp.eval_seq_len, "seconds": s,
                      "tokens_per_s": n / s, "projected_full_val_8gpu_s": VAL_TOKENS_FULL / (n / s * EVAL_GPUS)}
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore():
        model.load_state_dict(base)

    m = min(args.ttt_chunks * hp.ttt_chunk_tokens, len(val) - 1)
    toks = val[:m + 1]
    for name in ("muon", "sgd"):
        hp_ttt = dataclasses.replace(hp, ttt_optimizer=name, eval_budget_seconds=1e12)
        info = {}

        def run():
            info["result"] = tg.eval_ttt(scorer, toks, hp_ttt, rt, luts, time.perf_counter())

        restore()
        run()  # warm-up
        s = timed(run, args.repeats, sync, setup=restore)
        _, _, adapted, n_chunks = info["result"]
        out[f"ttt_{name}"] = {"tokens": m, "chunks": n_chunks, "chunks_adapted": adapted, "epochs": hp.ttt_epochs,
                              "seconds": s, "tokens_per_s": m / s,
                              "projected_full_val_8gpu_s": VAL_TOKENS_FULL / (m / s * EVAL_GPUS)}
    restore()
    out["peak_memory_mib"] = peak_memory_mib(rt)
    out["projection"] = f"{VAL_TOKENS_FULL} tokens / (tokens_per_s * {EVAL_GPUS}), linear scaling"
    return out


def bench_compress(model, hp, rt, args, sync, code_bytes):
    repeats = max(1, min(args.repeats, args.compress_repeats))
    model.eval()
    reset_peak_memory(rt)
    box = {}

    def collect():
        box["hessians"] = tg.collect_hessians(model, hp, rt)

    hessian_s = timed(collect, repeats, sync)
    hessians = box["hessians"]
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    mats = tg.bank_matrices(hp.num_layers)

    def gptq_all():
        box["fallbacks"] = sum(
            tg.gptq_quantize(state[bank][idx], hessians[key], hp.matrix_bits, hp.gptq_block_size, hp.gptq_damp,
                             hp.clip_sigmas_mlp) is None for bank, idx, key, _ in mats)

    gptq_s = timed(gptq_all, repeats, sync)
    parts = {"sdclip_plan": [], "prune_to_fit": []}
    originals = {name: getattr(tg, name) for name in parts}

    def timing(name):
        def wrapper(*a, **kw):
            sync()
            t0 = time.perf_counter()
            result = originals[name](*a, **kw)
            sync()
            parts[name].append(time.perf_counter() - t0)
            return result
        return wrapper

    error = None
    try:
        for name in parts:
            setattr(tg, name, timing(name))

        def pack():
            box["blob"] = tg.quantize_model(model, hessians, hp, rt, code_bytes)

        total_s = timed(pack, repeats, sync)
    except tg.ConfigError as e:
        error, total_s = str(e), None
    finally:
        for name, fn in originals.items():
            setattr(tg, name, fn)
    blob = box.get("blob")
    out = {
        "calib_batches": hp.gptq_calib_batches, "hessian_s": hessian_s, "matrices": len(mats),
        "gptq_bits": hp.matrix_bits, "gptq_s": gptq_s, "gptq_cholesky_fallbacks": box["fallbacks"],
        "quantize_model_s": total_s,
        "plan_s": statistics.median(parts["sdclip_plan"]) if parts["sdclip_plan"] else None,
        "prune_and_pack_s": statistics.median(parts["prune_to_fit"]) if parts["prune_to_fit"] else None,
        "artifact_bytes": len(blob) if blob else None, "code_bytes": code_bytes,
        "total_bytes": len(blob) + code_bytes if blob else None, "target_bytes": hp.target_bytes,
        "compressor": ("brotli" if blob[:1] == b"B" else "lzma") if blob else None,
        "peak_memory_mib": peak_memory_mib(rt), "error": error,
    }
    return out


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def fmt(v):
    if v is None:
        return "null"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:,.2f}" if abs(v) >= 100 else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(report):
    d = report["device"]
    rows = [("device", "name", f"{d['name']} ({d['type']}, torch {d['torch']}, {d['attention']})"),
            ("device", "data", report["data"])]
    t = report.get("train")
    if t:
        rows += [("train", "ms/step", t["ms_per_step"]), ("train", "tokens/s", t["tokens_per_s"]),
                 ("train", "fwd+bwd ms/step", t["fwd_bwd_ms"]), ("train", "optimizer ms/step", t["optimizer_ms"]),
                 ("train", "averager ms/step", t["averager_ms"]),
                 ("train", "newton-schulz ms (1 GPU, all banks)", t["newton_schulz"]["total_ms"]),
                 ("train", "newton-schulz ms (per rank of 8)", t["newton_schulz"]["per_rank_8gpu_ms"]),
                 ("train", "model FLOPs/token", t["flops_per_token"]), ("train", "MFU (bf16 peak)", t["mfu"]),
                 ("train", "peak memory MiB", t["peak_memory_mib"]), ("train", "params", t["params"])]
        for b in t["newton_schulz"]["banks"]:
            rows.append(("train", f"  NS {'x'.join(map(str, b['shape']))} ms", b["ms"]))
    e = report.get("eval")
    if e:
        for key, label in (("sliding", "sliding"), ("ttt_muon", "TTT muon"), ("ttt_sgd", "TTT sgd")):
            rows += [("eval", f"{label} tokens/s", e[key]["tokens_per_s"]),
                     ("eval", f"{label} projected 62M tokens on 8 GPUs s", e[key]["projected_full_val_8gpu_s"])]
    c = report.get("compress")
    if c:
        rows += [("compress", "hessians s", c["hessian_s"]), ("compress", "GPTQ (all banks) s", c["gptq_s"]),
                 ("compress", "quantize_model total s", c["quantize_model_s"]),
                 ("compress", "  SDClip sizing s", c["plan_s"]),
                 ("compress", "  pruning search + packing s", c["prune_and_pack_s"]),
                 ("compress", "artifact bytes", c["artifact_bytes"]),
                 ("compress", "total bytes (+code)", c["total_bytes"])]
        if c["error"]:
            rows.append(("compress", "error", c["error"]))
    w = [max(len(r[i]) if i < 2 else len(fmt(r[2])) for r in rows) for i in range(3)]
    lines = [f"{'section':<{w[0]}}  {'metric':<{w[1]}}  value", "-" * (w[0] + w[1] + w[2] + 4)]
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {fmt(v)}" for a, b, v in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--mode", choices=["train", "eval", "compress", "all"], default="all")
    ap.add_argument("--steps", type=int, help="timed optimizer steps (cpu 10, cuda 20)")
    ap.add_argument("--warmup", type=int, help="untimed warm-up steps (cpu 2, cuda 5)")
    ap.add_argument("--repeats", type=int, help="repeats for NS, eval and compress timings; median reported (3)")
    ap.add_argument("--compress-repeats", type=int, default=1, help="cap on repeats for the compress timings")
    ap.add_argument("--eval-tokens", type=int, help="predictions scored by the sliding-window timing")
    ap.add_argument("--ttt-chunks", type=int, help="TTT_CHUNK_TOKENS chunks in the TTT slice")
    ap.add_argument("--synthetic", action="store_true", help="uniform random tokens instead of DATA_PATH shards")
    ap.add_argument("--qat", action="store_true", help="time training with late QAT's fake quantization on")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak (H100 SXM: 989)")
    ap.add_argument("--threads", type=int, help="CPU torch threads (default: OMP_NUM_THREADS, else 1; a shared "
                    "machine makes more threads slower)")
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args(argv)
    args.device = pick_device(args.device)
    for k, v in DEFAULTS[args.device].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "repeats", "eval_tokens", "ttt_chunks"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.device == "cpu" and args.threads is None:
        args.threads = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    return args


def main(argv=None):
    args = parse_args(argv)
    hp = load_config(args.device)
    if args.device == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modes = ["train", "eval", "compress"] if args.mode == "all" else [args.mode]
    code_path = REPO / "train_gpt.py"
    code_bytes = os.path.getsize(code_path if code_path.exists() else REPO / "train_gpt_human.py")
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        rt = QuietRuntime(0, 1, device, os.path.join(tmp, "bench.log"))
        tg.select_attention(hp, device)
        val_needed = max(args.eval_tokens, args.ttt_chunks * hp.ttt_chunk_tokens) + 1
        config = dataclasses.asdict(hp)  # before a synthetic run points DATA_PATH at its temporary shards
        hp, val, luts, data = prepare_data(hp, args, tmp, val_needed)
        torch.manual_seed(hp.seed)
        report = {"tool": "tools/bench.py", "time": datetime.datetime.now().isoformat(timespec="seconds"),
                  "device": device_info(rt, args, hp), "data": data, "modes": modes,
                  "args": {k: v for k, v in vars(args).items() if k != "out"},
                  "config": config}
        model = None
        if "train" in modes:
            model, report["train"] = bench_train(hp, rt, args, sync)
            report["weights"] = f"after {args.warmup + 2 * args.steps} benchmark training steps"
        if model is None and ("eval" in modes or "compress" in modes):
            torch.manual_seed(hp.seed)
            model = tg.GPT(hp).to(device)
            with torch.no_grad():  # the zero-initialised MLP output bank would make GPTQ and brotli unrealistic
                for w in model.mlp_down:
                    torch.nn.init.orthogonal_(w, gain=0.5)
            report["weights"] = "init (mlp_down randomised)"
        if "eval" in modes:
            report["eval"] = bench_eval(model, val, hp, rt, luts, args, sync)
        if "compress" in modes:
            report["compress"] = bench_compress(model, hp, rt, args, sync, code_bytes)
    print(table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    try:
        main()
    except tg.ConfigError as e:
        sys.exit(f"error: {e}")
