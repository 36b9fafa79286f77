#!/usr/bin/env python3
"""Everything one GPU can tell us about train_gpt_human.py, in one call of at most 8 minutes (issue 19, part 1).
A development tool, not part of the submitted artifact.

    bash tools/gpu_check.sh OUT_DIR          # full size, one CUDA GPU (installs .whl/*.whl first, offline)
    bash tools/gpu_check.sh --cpu OUT_DIR    # the same code path at a tiny size on the CPU (CI; a minute or two)
    python3 tools/gpu_check.py --out OUT_DIR [--parts seed.train,record.eval] [--set record:ATTN_KERNEL=flex]

Writes OUT_DIR/gpu_check.json (the shape below; other tools read it), OUT_DIR/gpu_check.md (the table) and
OUT_DIR/logs/<part>.log; commits nothing.  Data: synthetic shards in the challenge's format (BOS=1 before every
document, log-normal document lengths) in a scratch directory; tokenizers copied from shared/tokenizers,
../shared/tokenizers or data/tokenizers, else a word-level SentencePiece model of the right size trained on the spot
(only the byte accounting uses it; speed does not depend on it).

Parts, in priority order, each a subprocess with its own time limit inside a total deadline (480 s at full size), so
one crash, hang or out-of-memory never costs the others.  A part writes its results as it goes; at its time limit it
gets SIGTERM and writes a summary of what it timed (training steps done, phased TTT steps) before it stops; its error (traceback, or the log's tail) lands in the JSON.  A part the deadline leaves no time for is
recorded as skipped: rerun it alone with --parts.

  info           device, versions, brotli / FlashAttention builds
  <p>.train      p = seed, record: full-size training at world size 1 with gradient accumulation 8 (one rank's share
                 of 8xH100's step): compile time, steady ms/step (record: before and after the depth-recurrence loops
                 switch on), tokens/s, MFU, peak memory, attention kernel, dynamo graph breaks / recompiles;
                 Newton-Schulz ms per optimizer step; Hessian collection for the preset's GPTQ_CALIB_BATCHES (timed
                 on 8 batches, scaled linearly); projected steps in 600 s on 8xH100
  <p>.eval       sliding-window and roundtrip eval tokens/s; chunk TTT (muon, sgd) on a few hundred synthetic
                 documents; projected full-validation eval time on 8xH100 against 600 s
  record.phased  phased TTT (the record's TTT_MODE) on a sample of documents: every step timed with its shape (rows,
                 row length), compile steps told apart by dynamo's graph count, row-tokens/s, global-phase tokens/s,
                 the projected eval time (seed.phased: on request, and in --cpu runs)
  <p>.quant      quantize_model (GPTQ + packing + compression) of the full-size model, on the GPU, and load_artifact

JSON (keys other tools read; everything else is extra):
  device, torch, mode ("full"/"cpu"), ok,
  presets.<p>.train: tokens_per_s (per GPU), ms_per_step (per 786,432-token step; record: the run's average, the
                     loops on for the last 65% of the time), ms_per_step_pre_loop / _post_loop (record),
                     peak_mem_gib, attention, compile_s, mfu, flops_per_token, newton_schulz_ms_per_step,
                     hessian_s, projected_steps_600s_8xh100, reference_steps, dynamo
  presets.<p>.eval:  sliding_tokens_per_s, ttt_projected_s_8xh100 (the preset's own TTT_MODE), ttt_chunk_muon,
                     ttt_chunk_sgd, ttt_phased, eval_projected_total_s_8xh100, within_600s
  presets.<p>.quant: quantize_s, gptq_s, artifact_bytes, total_bytes, fits, load_artifact_s,
                     awq (AWQ_GROUPS=1 on the device, one matrix: group, gptq_s, max_code)
  parts.<name>:      ok, seconds, timeout_s, timed_out, rc, error, log

Formulas (also stated in the JSON):
  model FLOPs/token  6*N + 12*L_v*T*d: N = weights used in matmuls per token (banks once per virtual layer, so looped
                     layers count once per pass; tied head V*d; EngramLite and value-embedding projections), L_v =
                     virtual layers, T = TRAIN_SEQ_LEN, attention over the full T x T (not halved for causality, not
                     reduced for document isolation).  MFU = FLOPs/token * tokens/s / the card's dense bf16 peak.
  8xH100 projections linear in this card's rate, no H200->H100 correction, no communication: training steps in
                     600 s - GPTQ_RESERVE_MS at ms_per_step/8 (record: 35% of the time before the loops, 65% after);
                     eval: validation tokens (62,021,632 for sp1024, 47,851,520 for sp8192; 50,000 documents) / 8 /
                     steady tokens/s, plus the compile time measured on the first calls.  Phased TTT: 50,000
                     log-normal document lengths in batches, each batch's steps from the trainer's doc_steps(), each
                     step's seconds fitted on this card's steady steps (a + b*rows*length [+ c*rows*length^2]), the
                     total shared by 8 ranks; global phases at this card's tokens/s / 8; plus compile time.

Failures on purpose (tests): GPU_CHECK_FAIL=part[:hang],... makes those parts raise (or hang) at the start.
"""
import argparse
import contextlib
import copy
import datetime
import importlib.util
import inspect
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRESET_NAMES = ("seed", "record")
# Default parts in priority order; seed.phased (the seed's own TTT is chunk) only when asked for (--parts) or on --cpu.
PARTS = ["info", "seed.train", "record.train", "seed.eval", "record.eval", "record.phased", "seed.quant",
         "record.quant"]
ALL_PARTS = PARTS + ["seed.phased"]

EVAL_GPUS = 8
VAL_DOCS = 50_000
VAL_TOKENS = {1024: 62_021_632, 8192: 47_851_520}  # the challenge's validation split per tokenizer
TRAIN_SECONDS = 600.0
REFERENCE_STEPS = {"seed": 6291, "record": 4931}  # steps in 600 s on 8xH100: PR #1089 (the seed) and the record
REFERENCE_NOTE = "seed: PR #1089's 6,291 steps; record: the accepted record's 4,931 steps (8xH100, 600 s)"
TOKENIZERS = {1024: "fineweb_1024_bpe.model", 8192: "fineweb_8192_bpe.model"}
PEAK_TFLOPS = [("H100 PCIE", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0)]  # dense bf16, first match of the card's name wins

# Sizes.  "full" is the real model on one GPU; "cpu" is a tiny model with the same code path.
SIZES = {
    "full": {"warmup": 1, "steps": 20, "ns_repeats": 5, "hessian_batches": 8, "train_shard_tokens": 4_000_000,
             "eval_docs": 300, "phased_docs": 192, "phased_cap": 4096, "doc_sigma": 1.0, "total_s": 480.0,
             "grace_s": 15.0, "threads": 0, "parts": PARTS,
             "budgets": {"info": 30, "seed.train": 110, "record.train": 160, "seed.eval": 90, "record.eval": 90,
                         "record.phased": 150, "seed.quant": 60, "record.quant": 60, "seed.phased": 150}},
    "cpu": {"warmup": 1, "steps": 3, "ns_repeats": 2, "hessian_batches": 4, "train_shard_tokens": 65_536,
            "eval_docs": 24, "phased_docs": 24, "phased_cap": 256, "doc_sigma": 1.0, "total_s": 300.0,
            "grace_s": 5.0, "threads": 1, "parts": ALL_PARTS, "budgets": {name: 120 for name in ALL_PARTS}},
}
CPU_COMMON = {  # tiny, but gradient accumulation 8 as at full size; every preset keeps its own switches
    "DEVICE": "cpu", "COMPILE": "0", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "VOCAB_SIZE": "1024",
    "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "8192",
    "EVAL_STRIDE": "64", "EVAL_BATCH_SEQS": "16", "GPTQ_CALIB_BATCHES": "4", "TTT_CHUNK_TOKENS": "512",
    "TTT_BATCH_SEQS": "4", "TTT_DOC_BATCH": "8", "TTT_LORA_RANK": "8", "TARGET_BYTES": "2000000",
}
CPU_PRESET = {"seed": {"NUM_LAYERS": "2", "ENGRAM_BUCKETS": "256", "VE_DIM": "16"},
              "record": {"NUM_LAYERS": "4", "LOOP_START": "1", "LOOP_END": "2", "PARALLEL_START": "3"}}
CHECK_ENV = {"EVAL_BUDGET_SECONDS": "1e9"}  # TTT's budget guard must not stop adapting part-way through a timing


# ====================================================================================================
# Adapter: every use of the trainer's internals is in this section, and nowhere else.  When the trainer changes,
# this is the code to fix.  Functions and attributes of train_gpt_human (as tg) used:
#   Hyperparameters.from_env(env), setup_runtime(hp), Runtime, select_attention(hp, device) (optional),
#   ATTENTION["kernel"] / FLASH (optional), GPT(hp), model.looping, model.mlp_down, maybe_compile(model, hp, rt),
#   compile_enabled(hp, rt), build_optimizers(model, hp, 1), WeightAverager(model, hp).update(model, step, 1.0),
#   grad_accum_steps(hp, 1), shard_files(path, "train"), DistributedTokenLoader(files, hp, 0, 1, device),
#   train_step(step_model, opt, loader, hp, rt, accum, 1.0), layer_order(hp, looping), model.qo/kv/mlp_up,
#   collect_hessians(model, hp, rt), load_val_tokens(hp), load_tokenizer(hp), build_byte_luts(sp, vocab),
#   eval_sliding(model, tokens, hp, rt, luts), eval_full(...), eval_ttt(model, tokens, hp, rt, luts, t0),
#   quantize_model(model, hessians, hp, rt, code_bytes), load_artifact(blob, hp, device), brotli;
#   split_documents(tokens), doc_steps(docs, hp) (optional; else legacy_doc_steps(), the rule before it);
#   timed by wrapping (called by the trainer, arguments read by name): score_windows(windows), adapt_on_chunk(begin,
#   end), score_doc_batch(docs), padded_batch(rows, seq_len), global_phase(docs), gptq_quantize; torch._dynamo.utils.counters; and tools/bench.py: bench_newton_schulz(opt, hp, rt, repeats,
#   sync), matmul_params(model), synthetic_luts(V).
# ====================================================================================================


class Adapter:
    def __init__(self, ctx, preset=None):
        self.ctx, self.preset = ctx, preset
        self.tg = load_trainer(ctx["trainer"])
        sys.path.insert(0, str(REPO / "tools"))
        import bench  # noqa: E402  (after load_trainer, so bench shares the trainer module chosen by --trainer)
        import torch
        self.bench, self.torch, self.lines = bench, torch, []
        if ctx["sizes"]["threads"]:
            torch.set_num_threads(ctx["sizes"]["threads"])
        self.env = dict(ctx["presets"][preset]["env"]) if preset else None
        self.hp = self.hp_with() if preset else None
        self.rt = self.runtime() if preset else None

    # --- config and runtime
    def hp_with(self, **settings):
        env = dict(self.env)
        env.update({k.upper(): str(v) for k, v in settings.items()})
        return self.tg.Hyperparameters.from_env(env)

    def runtime(self):
        rt = self.tg.setup_runtime(self.hp)  # CUDA device, TF32 and `logs/` (in the scratch directory) as a run has

        def log(msg):  # the trainer's log lines go to the part's log (stdout) and are kept for parsing
            self.lines.append(msg)
            print(msg, flush=True)

        rt.log = log
        return rt

    @property
    def is_cuda(self):
        return self.rt.device.type == "cuda"

    def sync(self):
        if self.is_cuda:
            self.torch.cuda.synchronize()

    def select_attention(self):
        """(kernel name, where the name came from)."""
        tg = self.tg
        if hasattr(tg, "select_attention"):
            kernel = tg.select_attention(self.hp, self.rt.device)
            if isinstance(kernel, str):
                return kernel, "select_attention()"
        for line in reversed(self.lines):
            if line.startswith("attention:"):
                return line.split()[0].split(":", 1)[1], "log line attention:"
        if isinstance(getattr(tg, "ATTENTION", None), dict) and "kernel" in tg.ATTENTION:
            return str(tg.ATTENTION["kernel"]), "ATTENTION['kernel']"
        fa3 = getattr(tg, "flash_attn_3", None) is not None and self.is_cuda
        return ("fa3" if fa3 and not self.hp.doc_isolation else "sdpa"), "guessed (the trainer names no kernel)"

    def flash_builds(self):
        if isinstance(getattr(self.tg, "FLASH", None), dict):
            return sorted(self.tg.FLASH)
        return ["fa3"] if getattr(self.tg, "flash_attn_3", None) is not None else []

    # --- model
    def build_model(self, randomise_output=False):
        self.torch.manual_seed(self.hp.seed)
        model = self.tg.GPT(self.hp).to(self.rt.device)
        if randomise_output:  # the zero-initialised MLP output bank would make GPTQ and compression unrealistic
            with self.torch.no_grad():
                for w in model.mlp_down:
                    self.torch.nn.init.orthogonal_(w, gain=0.5)
        return model

    def compile(self, model):
        return self.tg.maybe_compile(model, self.hp, self.rt)

    def compile_enabled(self):
        return bool(self.tg.compile_enabled(self.hp, self.rt))

    def set_looping(self, model, on):
        model.looping = bool(on)

    def n_params(self, model):
        return sum(p.numel() for p in model.parameters())

    def flops_per_token(self, model, looping):
        """(6*N + 12*L_v*T*d, N, L_v): looped layers' bank matrices count once per pass."""
        hp = self.hp
        encoder, decoder = self.tg.layer_order(hp, looping)
        virtual = len(encoder) + len(decoder)
        per_layer = sum(b.numel() for b in (model.qo, model.kv, model.mlp_up, model.mlp_down)) // hp.num_layers
        n = self.bench.matmul_params(model) + (virtual - hp.num_layers) * per_layer
        return 6 * n + 12 * virtual * hp.train_seq_len * hp.model_dim, n, virtual

    # --- training
    def training(self, model):
        """Everything train() sets up for its loop, at world size 1: (step function(step index) -> loss, opt, accum)."""
        tg, hp, rt = self.tg, self.hp, self.rt
        step_model = self.compile(model)
        opt = tg.build_optimizers(model, hp, 1)
        averager = tg.WeightAverager(model, hp)
        accum = tg.grad_accum_steps(hp, 1)
        loader = self.loader()

        def step(i):
            loss = tg.train_step(step_model, opt, loader, hp, rt, accum, 1.0)
            averager.update(model, i, 1.0)
            return loss

        return step, opt, accum

    def loader(self):
        tg, hp = self.tg, self.hp
        files = tg.shard_files(hp.data_path, "train")
        first = list(inspect.signature(tg.DistributedTokenLoader).parameters)[1]
        if first == "hp":
            return tg.DistributedTokenLoader(files, hp, 0, 1, self.rt.device)
        if first == "vocab_size":  # the loader before document-isolated packing
            return tg.DistributedTokenLoader(files, hp.vocab_size, 0, 1, self.rt.device)
        raise TypeError(f"adapter: DistributedTokenLoader{inspect.signature(tg.DistributedTokenLoader)} is new to "
                        f"tools/gpu_check.py; update Adapter.loader()")

    def newton_schulz(self, opt, repeats):
        return self.bench.bench_newton_schulz(opt, self.hp, self.rt, repeats, self.sync)

    def collect_hessians(self, model, hp=None):
        return self.tg.collect_hessians(model, hp or self.hp, self.rt)

    # --- eval
    def val_tokens(self):
        return self.tg.load_val_tokens(self.hp)

    def luts(self):
        """(byte LUTs, source): the tokenizer's, else synthetic (byte counts do not change speed)."""
        try:
            return self.tg.build_byte_luts(self.tg.load_tokenizer(self.hp), self.hp.vocab_size), self.hp.tokenizer_path
        except Exception as e:  # noqa: BLE001 - any tokenizer problem: synthetic counts are fine for timing
            return self.bench.synthetic_luts(self.hp.vocab_size), f"synthetic ({type(e).__name__}: {e})"

    def eval_sliding(self, scorer, tokens, luts):
        return self.tg.eval_sliding(scorer, tokens, self.hp, self.rt, luts)

    def eval_roundtrip(self, scorer, tokens, luts):
        return self.tg.eval_full(scorer, tokens, self.hp, self.rt, luts)

    def eval_ttt(self, scorer, tokens, hp, luts):
        """(loss, bpb, adapted, total) of TTT in hp.ttt_mode."""
        return self.tg.eval_ttt(scorer, tokens, hp, self.rt, luts, time.perf_counter())

    def split_documents(self, tokens):
        return self.tg.split_documents(tokens)

    def doc_steps(self, lengths, hp):
        """[(rows, row length)] of the steps score_doc_batch takes on documents of these prediction counts."""
        if hasattr(self.tg, "doc_steps"):
            return [(int(r), int(n)) for r, n in self.tg.doc_steps([(0, int(n)) for n in lengths], hp)]
        return legacy_doc_steps(lengths, hp)

    def graphs(self):
        """Graphs dynamo has compiled in this process so far (a step that adds one compiled)."""
        return int(self.torch._dynamo.utils.counters["stats"].get("unique_graphs", 0))

    @contextlib.contextmanager
    def instrument(self, names):
        """Wraps tg.<name> for the duration: yields {name: [call records]}.  score_windows, adapt_on_chunk,
        score_doc_batch, global_phase and gptq_quantize are timed between device syncs and record what they processed;
        padded_batch inside score_doc_batch records each step's start (synced) and shape."""
        tg, calls, originals, state = self.tg, {n: [] for n in names}, {}, {"in_doc_batch": False, "batch": -1}

        def wrap(name, fn):
            sig = inspect.signature(fn)

            def wrapper(*args, **kwargs):
                a = sig.bind(*args, **kwargs).arguments
                if name == "padded_batch":
                    if state["in_doc_batch"]:
                        self.sync()
                        calls[name].append({"t": time.perf_counter(), "rows": int(a["rows"]),
                                            "seq_len": int(a["seq_len"]), "batch": state["batch"],
                                            "graphs": self.graphs()})
                    return fn(*args, **kwargs)
                self.sync()
                t0 = time.perf_counter()
                state["in_doc_batch"] = name == "score_doc_batch"
                state["batch"] += state["in_doc_batch"]
                try:
                    out = fn(*args, **kwargs)
                    self.sync()
                finally:
                    state["in_doc_batch"] = False
                rec = {"t0": t0, "t1": time.perf_counter(), "index": state["batch"], "graphs": self.graphs()}
                rec["seconds"] = rec["t1"] - t0
                if name == "score_windows":
                    rec["predictions"] = sum(length - start for _, length, start in a["windows"])
                elif name == "adapt_on_chunk":
                    rec["tokens"] = int(a["end"]) - int(a["begin"])
                elif name in ("score_doc_batch", "global_phase"):
                    rec["doc_lengths"] = [int(e) - int(b) for b, e in a["docs"]]
                calls[name].append(rec)
                return out

            return wrapper

        try:
            for name in names:
                originals[name] = getattr(tg, name)
                setattr(tg, name, wrap(name, originals[name]))
            yield calls
        finally:
            for name, fn in originals.items():
                setattr(tg, name, fn)

    # --- quantization
    def code_bytes(self):
        path = REPO / "train_gpt.py"
        return os.path.getsize(path if path.exists() else self.ctx["trainer"])

    def quantize(self, model, hessians):
        return self.tg.quantize_model(model, hessians, self.hp, self.rt, self.code_bytes())

    def load_artifact(self, blob):
        return self.tg.load_artifact(blob, self.hp, self.rt.device)

    def compressor(self, blob):
        return {b"B": "brotli", b"L": "lzma"}.get(blob[:1], "unknown")


def legacy_doc_steps(lengths, hp):
    """score_doc_batch's steps before the trainer had doc_steps(): TTT_DOC_BATCH rows always, each step's row length the
    next power of two >= its longest window (at least TTT_DOC_CHUNK), at most EVAL_SEQ_LEN."""
    C, S, longest_doc = hp.ttt_doc_chunk, hp.eval_seq_len, max(lengths)
    out = []
    for s in range(-(-longest_doc // C)):
        longest = max(C, min((s + 1) * C, longest_doc, S))
        out.append((hp.ttt_doc_batch, min(S, 1 << (longest - 1).bit_length())))
    return out


def phased_projection(doc_lengths, batch_docs, steps_of, step_seconds, world_size):
    """Documents in length order in batches of batch_docs; each batch's steps (steps_of(lengths) -> [(rows, length)])
    timed by step_seconds(rows, length).  The trainer deals batches to ranks by cost, so a rank's share is the total
    over world_size, but never less than the largest batch.  Returns (seconds per rank, largest batch seconds,
    steps, row-tokens) of the whole set."""
    docs = sorted(int(n) for n in doc_lengths)
    total, largest, n_steps, row_tokens = 0.0, 0.0, 0, 0
    for i in range(0, len(docs), batch_docs):
        steps = steps_of(docs[i:i + batch_docs])
        seconds = sum(step_seconds(r, n) for r, n in steps)
        total, largest = total + seconds, max(largest, seconds)
        n_steps, row_tokens = n_steps + len(steps), row_tokens + sum(r * n for r, n in steps)
    return max(total / world_size, largest), largest, n_steps, row_tokens


def fit_step_seconds(samples):
    """Least-squares seconds per step from [(rows, length, seconds)]: a + b*row_tokens + c*row_tokens*length (the
    last for attention's length-quadratic share), dropping c, then a, when a coefficient comes out negative or there
    are too few distinct shapes.  Returns (function (rows, length) -> seconds, description)."""
    X = np.array([[1.0, r * n, r * n * n] for r, n, _ in samples])
    y = np.array([t for _, _, t in samples])
    distinct = len({(r, n) for r, n, _ in samples})
    for cols, name in (([0, 1, 2], "a + b*RT + c*RT*L"), ([0, 1], "a + b*RT"), ([1], "b*RT")):
        if distinct < len(cols) + 1 and len(cols) > 1:
            continue
        coef, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
        if (coef >= 0).all() and coef.any():
            full = np.zeros(3)
            full[cols] = coef
            pred = X @ full
            err = float(np.median(np.abs(pred - y) / np.maximum(y, 1e-9)))
            return (lambda r, n, f=full: float(f[0] + f[1] * r * n + f[2] * r * n * n),
                    {"model": name, "a_s": full[0], "b_s_per_row_token": full[1], "c_s_per_row_token_length": full[2],
                     "median_rel_error": err, "steps": len(samples), "shapes": distinct})
    rate = y.sum() / max(X[:, 1].sum(), 1.0)
    return (lambda r, n: rate * r * n), {"model": "mean s per row-token", "b_s_per_row_token": rate,
                                          "steps": len(samples), "shapes": distinct}


def load_trainer(path):
    """The trainer module (train_gpt_human, or the file --trainer names, registered under that name)."""
    if "train_gpt_human" in sys.modules:
        return sys.modules["train_gpt_human"]
    spec = importlib.util.spec_from_file_location("train_gpt_human", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt_human"] = module
    spec.loader.exec_module(module)
    return module


# ====================================================================================================
# Parts (each runs in its own process; `res` keeps what is measured, on disk, as it is measured)
# ====================================================================================================


class Result:
    def __init__(self, path):
        self.path, self.data = Path(path), {}

    def put(self, key, value):
        node = self.data
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def update(self, prefix, values):
        for k, v in values.items():
            self.put(f"{prefix}.{k}" if prefix else k, v)


def error_text(exc=None, limit=3000):
    text = traceback.format_exc() if exc is None else "".join(traceback.format_exception(type(exc), exc,
                                                                                         exc.__traceback__))
    return text[-limit:]


def guarded(res, key, fn):
    """Runs fn(); on an exception records it under key.error and carries on (the other measurements still run)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - any failure is a finding to record
        res.put(f"{key}.error", error_text())
        return None


def card_peak_tflops(name, override):
    if override:
        return override
    upper = name.upper()
    return next((tf for key, tf in PEAK_TFLOPS if key in upper), None)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(A):
    if A.is_cuda:
        return A.torch.cuda.get_device_name(A.rt.device)
    return cpu_name()


def peak_gib(A):
    if A.is_cuda:
        return A.torch.cuda.max_memory_allocated(A.rt.device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def reset_peak(A):
    if A.is_cuda:
        A.torch.cuda.reset_peak_memory_stats(A.rt.device)


class DynamoWatch:
    """Graph breaks, unique graphs and recompiles (torch._dynamo.utils.counters plus the recompiles log)."""

    def __init__(self):
        import logging
        import torch
        self.counters = torch._dynamo.utils.counters
        self.recompiles = []
        watch = self

        class Handler(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if "Recompiling" in msg:
                    watch.recompiles.append(msg.splitlines()[0][:200] + " | " + " ".join(msg.split("\n")[2:3])[:300])

        try:
            torch._logging.set_logs(recompiles=True)  # also printed to the part's log
        except Exception:  # noqa: BLE001
            pass
        logging.getLogger("torch._dynamo").addHandler(Handler())

    def snapshot(self):
        breaks = self.counters.get("graph_break", {})
        stats = self.counters.get("stats", {})
        reasons = sorted(breaks.items(), key=lambda kv: -kv[1])[:5]
        return {"graph_breaks": int(sum(breaks.values())), "unique_graphs": int(stats.get("unique_graphs", 0)),
                "frames": int(self.counters.get("frames", {}).get("total", 0)), "recompiles": len(self.recompiles),
                "graph_break_reasons": [f"{n}x {r.splitlines()[0][:160]}" for r, n in reasons],
                "recompile_reasons": self.recompiles[-5:]}


def timed_call(A, fn):
    A.sync()
    t0 = time.perf_counter()
    out = fn()
    A.sync()
    return time.perf_counter() - t0, out


def part_info(ctx, res):
    A = Adapter(ctx)
    torch = A.torch
    cuda = torch.cuda.is_available() and ctx["mode"] == "full"
    res.update("", {
        "device": torch.cuda.get_device_name(0) if cuda else cpu_name(), "device_type": "cuda" if cuda else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cpus": os.cpu_count(), "brotli": getattr(A.tg, "brotli", None) is not None, "flash_builds": A.flash_builds()})
    if cuda:
        props = torch.cuda.get_device_properties(0)
        res.update("", {"gpu_memory_gib": props.total_memory / 2**30, "sm_count": props.multi_processor_count,
                        "capability": f"{props.major}.{props.minor}"})
    try:
        import triton
        res.put("triton", triton.__version__)
    except Exception:  # noqa: BLE001
        res.put("triton", None)


def phase_stats(times, warmup, sfx):
    warm, run = times[:warmup], times[warmup:]
    if not run:
        return {}
    ms = 1000 * statistics.mean(run)
    return {f"ms_per_step{sfx}": ms, f"ms_per_step_median{sfx}": 1000 * statistics.median(run),
            f"ms_per_step_min{sfx}": 1000 * min(run), f"ms_per_step_max{sfx}": 1000 * max(run),
            f"steps_timed{sfx}": len(run), f"first_step_s{sfx}": warm[0] if warm else None,
            f"compile_s{sfx}": max(warm[0] - ms / 1000, 0.0) if warm else None}


def part_train(ctx, preset, res):
    sizes, A = ctx["sizes"], Adapter(ctx, preset)
    hp, watch = A.hp, DynamoWatch()
    kernel, source = A.select_attention()
    res.update("", {"attention": kernel, "attention_source": source})
    model = A.build_model()
    step, opt, accum = A.training(model)
    peak_tf = card_peak_tflops(device_name(A), ctx["peak_tflops"]) if A.is_cuda else None
    res.update("", {"device": device_name(A), "params": A.n_params(model), "tokens_per_step": hp.train_batch_tokens,
                    "world_size": 1, "grad_accum_steps": accum, "train_seq_len": hp.train_seq_len,
                    "compile": A.compile_enabled(), "peak_tflops": peak_tf,
                    "peak_mem_kind": "torch.cuda.max_memory_allocated" if A.is_cuda else "process max RSS",
                    "flops_formula": ("6*N + 12*L_v*T*d per token; N = matmul weights per token (looped layers once "
                                      "per pass, tied head V*d, EngramLite/VE projections); L_v = virtual layers; "
                                      "attention over the full TxT, T = TRAIN_SEQ_LEN")})
    phases = [("pre_loop", False), ("post_loop", True)] if hp.num_loops else [("", False)]
    reset_peak(A)
    i, steady = 0, {}
    for name, looping in phases:
        A.set_looping(model, looping)
        sfx, times, loss = f"_{name}" if name else "", [], None
        try:
            for _ in range(sizes["warmup"] + sizes["steps"]):
                seconds, loss = timed_call(A, lambda: step(i))
                times.append(seconds)
                i += 1
        finally:  # also on the time limit: the steps done so far are kept
            stats = phase_stats(times, sizes["warmup"], sfx)
            if stats:
                fpt, n_matmul, virtual = A.flops_per_token(model, looping)
                tps = hp.train_batch_tokens / (stats[f"ms_per_step{sfx}"] / 1000)
                steady[name] = stats[f"ms_per_step{sfx}"]
                stats.update({f"tokens_per_s{sfx}": tps, f"flops_per_token{sfx}": fpt,
                              f"matmul_params{sfx}": n_matmul, f"virtual_layers{sfx}": virtual,
                              f"mfu{sfx}": fpt * tps / (peak_tf * 1e12) if peak_tf else None})
            stats.update({f"peak_mem_gib{sfx}": peak_gib(A), f"dynamo{sfx}": watch.snapshot(),
                          f"last_loss{sfx}": float(loss) if loss is not None else None})
            res.update("", stats)
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"non-finite training loss {float(loss)} in phase {name or 'steady'}")
    cap_s = TRAIN_SECONDS - hp.gptq_reserve_ms / 1000
    if hp.num_loops:  # wall-clock schedule: the loops switch on at LOOP_ENABLE_AT of the run's time
        pre, post = steady["pre_loop"] / 1000, steady["post_loop"] / 1000
        f = hp.loop_enable_at
        res.update("", {"ms_per_step": 1000 / (f / pre + (1 - f) / post),
                        "ms_per_step_note": f"a run's average: loops off for the first {f:.0%} of the time, on after",
                        "compile_s": res.data["compile_s_pre_loop"], "peak_mem_gib": peak_gib(A),
                        "attention_flops_note": "document isolation: the real attention work is below the full TxT"})
        w_pre, w_post = f / pre, (1 - f) / post  # steps (so tokens) per second of the run in each phase
        fpt = (w_pre * res.data["flops_per_token_pre_loop"] + w_post * res.data["flops_per_token_post_loop"]) / (
            w_pre + w_post)
        tps = hp.train_batch_tokens / (res.data["ms_per_step"] / 1000)
        res.update("", {"tokens_per_s": tps, "flops_per_token": fpt,
                        "mfu": fpt * tps / (peak_tf * 1e12) if peak_tf else None})
    projected = cap_s / (res.data["ms_per_step"] / 1000 / EVAL_GPUS)
    res.update("", {"projected_steps_600s_8xh100": projected, "reference_steps": REFERENCE_STEPS[preset],
                    "projected_vs_reference": projected / REFERENCE_STEPS[preset],
                    "reference_ms_per_step_8xh100": 1000 * cap_s / REFERENCE_STEPS[preset],
                    "projection": (f"{cap_s:.0f} s (600 s - GPTQ_RESERVE_MS) / (ms_per_step / 8): linear in this "
                                   f"card's speed, no communication; {REFERENCE_NOTE}")})

    def newton_schulz():
        ns = A.newton_schulz(opt, sizes["ns_repeats"])
        res.update("", {"newton_schulz_ms_per_step": ns["total_ms"],
                        "newton_schulz_ms_per_rank_8gpu": ns["per_rank_8gpu_ms"], "newton_schulz_banks": ns["banks"],
                        "newton_schulz_steps": hp.muon_backend_steps, "newton_schulz_variant": hp.muon_variant})

    guarded(res, "newton_schulz", newton_schulz)
    del opt, step
    A.set_looping(model, hp.num_loops > 0)  # as main(): Hessians are collected on the looped model

    def hessians():  # timed on fewer batches, scaled to the preset's GPTQ_CALIB_BATCHES (linear: same work per batch)
        n, k = hp.gptq_calib_batches, max(1, min(hp.gptq_calib_batches, sizes["hessian_batches"]))
        A.collect_hessians(model, A.hp_with(GPTQ_CALIB_BATCHES=1))  # warm-up
        seconds, h = timed_call(A, lambda: A.collect_hessians(model, A.hp_with(GPTQ_CALIB_BATCHES=k)))
        res.update("", {"hessian_s": seconds * n / k, "hessian_s_measured": seconds, "hessian_batches_timed": k,
                        "hessian_calib_batches": n, "hessian_tokens": n * hp.train_batch_tokens // accum})
        A.torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                      "hessians": {k: v.cpu() for k, v in h.items()}, "steps": i},
                     Path(ctx["scratch"]) / f"{preset}_snapshot.pt")

    guarded(res, "hessians", hessians)
    res.put("dynamo", watch.snapshot())


def steady_rate(records, amount_key):
    """(seconds per unit over the calls after the first (which compiles), compile excess of the first call)."""
    if not records:
        return None, None
    rest = records[1:] or records
    per_unit = sum(r["seconds"] for r in rest) / max(sum(r[amount_key] for r in rest), 1)
    return per_unit, max(records[0]["seconds"] - records[0][amount_key] * per_unit, 0.0)


def measure_chunk_ttt(A, scorer, model, state, val, luts, optimizer, val_full):
    hp = A.hp_with(TTT_MODE="chunk", TTT_OPTIMIZER=optimizer)
    model.load_state_dict(state)
    with A.instrument(["score_windows", "adapt_on_chunk"]) as calls:
        seconds, (loss, bpb, adapted, n_chunks) = timed_call(A, lambda: A.eval_ttt(scorer, val, hp, luts))
    score_spt, score_compile = steady_rate(calls["score_windows"], "predictions")
    adapt_spt, adapt_compile = steady_rate(calls["adapt_on_chunk"], "tokens")
    if score_spt is None or adapt_spt is None:
        raise RuntimeError(f"chunk TTT made {len(calls['score_windows'])} scoring and {len(calls['adapt_on_chunk'])} "
                           f"adaptation calls; need both (more validation tokens than TTT_CHUNK_TOKENS?)")
    steady_s = val_full / EVAL_GPUS * (score_spt + adapt_spt)
    compile_s = score_compile + adapt_compile
    return {"tokens": len(val) - 1, "chunks": n_chunks, "chunks_adapted": adapted, "epochs": hp.ttt_epochs,
            "chunk_tokens": hp.ttt_chunk_tokens, "seconds": seconds, "tokens_per_s": 1 / (score_spt + adapt_spt),
            "tokens_per_s_with_compile": (len(val) - 1) / seconds, "score_tokens_per_s": 1 / score_spt,
            "adapt_tokens_per_s": 1 / adapt_spt, "compile_s": compile_s,
            "projected_steady_s_8xh100": steady_s, "projected_s_8xh100": steady_s + compile_s,
            "single_gpu_note": ("adaptation shares each chunk's sequences over the 8 ranks (2 rows each at the "
                                "defaults); linear scaling assumes a rank keeps this card's per-token rate"),
            "val_loss": loss}


def phased_steps(calls):
    """[(batch index, rows, row length, seconds, compiled)] of every step whose end is known: a step ends where the next
    step of its batch starts, the last where its batch ends (a batch cut off by the time limit loses its last step);
    compiled: dynamo compiled a graph during the step."""
    out, pb = [], calls["padded_batch"]
    ends = {b["index"]: (b["t1"], b["graphs"]) for b in calls["score_doc_batch"]}
    for j, p in enumerate(pb):
        nxt = pb[j + 1] if j + 1 < len(pb) and pb[j + 1]["batch"] == p["batch"] else None
        end = (nxt["t"], nxt["graphs"]) if nxt else ends.get(p["batch"])
        if end is not None:
            out.append((p["batch"], p["rows"], p["seq_len"], end[0] - p["t"], end[1] > p["graphs"]))
    return out


def phased_summary(A, hp, calls, tokens, doc_model, seconds, result):
    steps, batches = phased_steps(calls), calls["score_doc_batch"]
    if not steps:
        raise RuntimeError("phased TTT finished no step of any document batch")
    mismatches = sum([(r, n) for i, r, n, _, _ in steps if i == batch["index"]] != A.doc_steps(batch["doc_lengths"], hp)
                     for batch in batches)
    # steady steps: no compile, and not the very first (lazy initialisation)
    steady = [(r, n, t) for k, (_, r, n, t, compiled) in enumerate(steps) if k and not compiled]
    step_s, fit = fit_step_seconds(steady or [(r, n, t) for _, r, n, t, _ in steps])
    compiled = [(r, n, t) for k, (_, r, n, t, c) in enumerate(steps) if c or not k]
    compile_s = sum(max(t - step_s(r, n), 0.0) for r, n, t in compiled)
    steady_s = sum(t for _, _, t in steady)
    # global phases: their adapt_on_chunk calls, the very first (compiling the base model's training graph) left out
    g_spt, global_compile = steady_rate(calls["adapt_on_chunk"], "tokens")
    g_spt, global_compile = g_spt or 0.0, global_compile or 0.0
    docs_s, largest_s, n_steps, row_tokens = phased_projection(doc_model, hp.ttt_doc_batch,
                                                               lambda lens: A.doc_steps(lens, hp), step_s, EVAL_GPUS)
    mean_doc = float(np.mean(doc_model))
    global_tokens = sum(min(hp.ttt_prefix_docs * g // max(hp.ttt_phases, 1), len(doc_model)) * mean_doc
                        for g in range(1, hp.ttt_phases + 1))
    global_s = global_tokens * g_spt / EVAL_GPUS
    out = {"docs": len(A.split_documents(tokens)), "tokens": len(tokens) - 1, "doc_batch": hp.ttt_doc_batch,
           "doc_chunk": hp.ttt_doc_chunk, "phases": hp.ttt_phases, "global_optimizer": hp.ttt_global_optimizer,
           "lora_rank": hp.ttt_lora_rank, "seconds": seconds, "batches_completed": len(batches),
           "steps_timed": len(steps), "steps_compiling": len(compiled), "step_fit": fit,
           "row_tokens_per_s": sum(r * n for r, n, _ in steady) / steady_s if steady_s else None,
           "global_tokens_per_s": 1 / g_spt if g_spt else None, "global_chunks_timed": len(calls["adapt_on_chunk"]),
           "global_phases_run": len(calls["global_phase"]), "global_compile_s": global_compile,
           "global_note": None if g_spt else "no global phase ran in the sample: the projection leaves them out",
           "schedule_check": "ok" if not mismatches else f"{mismatches} batches differ from doc_steps()",
           "compile_s": compile_s + global_compile,
           "projected_doc_batches_s_8xh100": docs_s, "projected_largest_batch_s": largest_s,
           "projected_global_phases_s_8xh100": global_s, "projected_steps": n_steps,
           "projected_row_tokens": row_tokens, "projected_global_tokens": global_tokens,
           "projected_steady_s_8xh100": docs_s + global_s,
           "projected_s_8xh100": docs_s + global_s + compile_s + global_compile,
           "projection": ("50,000 log-normal document lengths in batches of TTT_DOC_BATCH (length order), each batch's "
                          "steps from the trainer's doc_steps(), each step timed by the fit on this card's steady "
                          "steps; the cost shared evenly by 8 ranks (at least the largest batch); global phases "
                          "(approximate: TTT_PREFIX_DOCS*g/TTT_PHASES documents of mean length after phase g) at this "
                          "card's seconds per token / 8; plus the compile time measured")}
    if result is not None:
        out.update({"batches": result[3], "batches_adapted": result[2], "val_loss": result[0],
                    "tokens_per_s_with_compile": (len(tokens) - 1) / seconds})
    return out


def part_phased(ctx, preset, res):
    sizes, A = ctx["sizes"], Adapter(ctx, preset)
    hp, watch = A.hp_with(TTT_MODE="phased"), DynamoWatch()
    kernel, source = A.select_attention()
    model = A.build_model(randomise_output=True)
    A.set_looping(model, hp.num_loops > 0)  # eval always runs the looped model
    scorer = A.compile(model)
    luts, _ = A.luts()
    val_full = VAL_TOKENS.get(hp.vocab_size, VAL_TOKENS[1024])
    tokens = A.torch.from_numpy(synthetic_stream(sizes["phased_docs"], mean_doc_tokens(ctx, hp.vocab_size),
                                                 sizes["doc_sigma"], hp.vocab_size, hp.seed + 7,
                                                 cap=sizes["phased_cap"]).astype(np.int64))
    doc_model = doc_lengths(VAL_DOCS, val_full, sizes["doc_sigma"], hp.seed)
    res.update("", {"attention": kernel, "device": device_name(A), "sample_docs": sizes["phased_docs"],
                    "sample_doc_cap": sizes["phased_cap"], "val_tokens_projected": val_full})
    # the sample's phases end within the first half of its own documents (pausing as one rank would, not 8: the
    # sample is small), so that its global phases run and are timed, even a single one (a phase after the last batch
    # never runs); the projection keeps the real TTT_PREFIX_DOCS
    hp_sample = A.hp_with(TTT_MODE="phased", TTT_PREFIX_DOCS=min(hp.ttt_prefix_docs, sizes["phased_docs"] // 2),
                          TTT_PAUSE_RANKS=1)
    reset_peak(A)
    result, interrupted = None, None
    t0 = time.perf_counter()
    with A.instrument(["score_doc_batch", "global_phase", "padded_batch", "adapt_on_chunk"]) as calls:
        try:
            _, result = timed_call(A, lambda: A.eval_ttt(scorer, tokens, hp_sample, luts))
        except PartTimeout as e:  # summarise what was timed, then stop
            interrupted = e
    summary = phased_summary(A, hp, calls, tokens, doc_model, time.perf_counter() - t0, result)
    summary.update({"interrupted": interrupted is not None, "peak_mem_gib": peak_gib(A), "dynamo": watch.snapshot()})
    res.put("ttt_phased", summary)
    if interrupted is not None:
        raise interrupted


def part_eval(ctx, preset, res):
    A = Adapter(ctx, preset)
    hp, watch = A.hp, DynamoWatch()
    kernel, source = A.select_attention()
    res.update("", {"attention": kernel, "attention_source": source})
    model = A.build_model(randomise_output=True)
    A.set_looping(model, hp.num_loops > 0)  # eval always runs the looped model
    scorer = A.compile(model)
    state = copy.deepcopy(model.state_dict())
    val = A.val_tokens()
    luts, lut_source = A.luts()
    val_full = VAL_TOKENS.get(hp.vocab_size, VAL_TOKENS[1024])
    res.update("", {"device": device_name(A), "sample_tokens": len(val) - 1, "sample_docs": ctx["sizes"]["eval_docs"],
                    "val_tokens_projected": val_full, "val_docs_projected": VAL_DOCS, "luts": lut_source,
                    "eval_seq_len": hp.eval_seq_len, "eval_stride": hp.eval_stride, "ttt_mode": hp.ttt_mode,
                    "ttt_optimizer": hp.ttt_optimizer})
    reset_peak(A)

    def sliding():
        warm, _ = timed_call(A, lambda: A.eval_sliding(scorer, val[:hp.eval_seq_len + 1], luts))  # compiles
        seconds, _ = timed_call(A, lambda: A.eval_sliding(scorer, val, luts))
        rate = (len(val) - 1) / seconds
        res.update("", {"sliding_tokens_per_s": rate, "sliding_compile_s": warm,
                        "sliding_projected_s_8xh100": val_full / (rate * EVAL_GPUS) + warm})

    def roundtrip():
        seconds, _ = timed_call(A, lambda: A.eval_roundtrip(scorer, val, luts))
        rate = (len(val) - 1) / seconds
        res.update("", {"roundtrip_tokens_per_s": rate, "roundtrip_projected_s_8xh100": val_full / (rate * EVAL_GPUS)})

    def chunk(optimizer):
        def run():
            res.put(f"ttt_chunk_{optimizer}",
                    measure_chunk_ttt(A, scorer, model, state, val, luts, optimizer, val_full))
        return run

    for name, fn in [("sliding", sliding), ("roundtrip", roundtrip), ("ttt_chunk_muon", chunk("muon")),
                     ("ttt_chunk_sgd", chunk("sgd"))]:
        guarded(res, name, fn)
        res.put("peak_mem_gib", peak_gib(A))
        if A.is_cuda:
            A.torch.cuda.empty_cache()
    res.put("dynamo", watch.snapshot())


def part_quant(ctx, preset, res):
    A = Adapter(ctx, preset)
    hp = A.hp
    A.select_attention()
    snapshot = Path(ctx["scratch"]) / f"{preset}_snapshot.pt"
    if snapshot.exists():
        model = A.build_model()
        saved = A.torch.load(snapshot, map_location=A.rt.device)
        model.load_state_dict(saved["model"])
        hessians = {k: v.to(A.rt.device) for k, v in saved["hessians"].items()}
        res.put("weights", f"after {saved['steps']} steps of the train part")
    else:
        model = A.build_model(randomise_output=True)
        A.set_looping(model, hp.num_loops > 0)
        hessians = A.collect_hessians(model, A.hp_with(GPTQ_CALIB_BATCHES=2))
        res.put("weights", "init (mlp_down randomised; the train part left no snapshot), 2 calibration batches")
    A.set_looping(model, hp.num_loops > 0)
    model.eval()
    res.update("", {"device": device_name(A), "matrix_bits": hp.matrix_bits, "code_bytes": A.code_bytes(),
                    "target_bytes": hp.target_bytes, "brotli": getattr(A.tg, "brotli", None) is not None})
    with A.instrument(["gptq_quantize"]) as calls:
        seconds, blob = timed_call(A, lambda: A.quantize(model, hessians))
    total = len(blob) + A.code_bytes()
    res.update("", {"quantize_s": seconds, "gptq_s": sum(c["seconds"] for c in calls["gptq_quantize"]),
                    "gptq_calls": len(calls["gptq_quantize"]), "artifact_bytes": len(blob), "total_bytes": total,
                    "fits": total <= hp.target_bytes, "compressor": A.compressor(blob)})
    seconds, _ = timed_call(A, lambda: A.load_artifact(blob))
    res.put("load_artifact_s", seconds)
    if hasattr(A.tg, "awq_columns"):  # AWQ_GROUPS (opt-in) on the device: its group, rounding and one GPTQ solve
        awq_hp = A.hp_with(AWQ_GROUPS=1)
        state = {k: v.detach().float() for k, v in model.state_dict().items()}
        target = next(t for t in A.tg.quant_targets(state, hessians, awq_hp) if t[5] is not None)
        A.tg.quantize_rtn(target[1], target[4], sigmas=12.0, hi=target[5])
        seconds, entries = timed_call(A, lambda: A.tg.gptq_all([target], [12.0], [], hessians, awq_hp, A.rt)[0])
        group = next(e for e in entries if ".awq" in e[0])
        res.put("awq", {"group": group[0], "gptq_s": seconds, "max_code": int(group[4].abs().max())})


class PartTimeout(BaseException):
    """The part's time limit (SIGTERM from the orchestrator); parts summarise what they timed, then stop."""


def on_sigterm(signum, frame):
    raise PartTimeout("stopped at the part's time limit (SIGTERM)")


def run_part(name, ctx, result_path):
    res = Result(result_path)
    fail = dict((item.split(":") + [""])[:2] for item in os.environ.get("GPU_CHECK_FAIL", "").split(",") if item)
    if name in fail:
        if fail[name] == "hang":
            res.put("note", "GPU_CHECK_FAIL: hanging on purpose")
            time.sleep(3600)
        raise RuntimeError(f"forced failure of part {name} (GPU_CHECK_FAIL)")
    if name == "info":
        return part_info(ctx, res)
    preset, kind = name.split(".")
    return {"train": part_train, "eval": part_eval, "phased": part_phased, "quant": part_quant}[kind](ctx, preset, res)


# ====================================================================================================
# Data and tokenizers (no torch needed)
# ====================================================================================================


def doc_lengths(n_docs, total_tokens, sigma, seed, cap=None):
    """n_docs log-normal lengths (at least 8) with mean total_tokens / n_docs, capped at `cap`."""
    rng = np.random.default_rng(seed)
    mean = total_tokens / n_docs
    lens = rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma, n_docs)
    lens = np.maximum(np.round(lens * total_tokens / lens.sum()), 8).astype(np.int64)
    return np.minimum(lens, cap) if cap else lens


def mean_doc_tokens(ctx, vocab_size):
    if ctx["mode"] == "cpu":
        return 100.0
    return VAL_TOKENS.get(vocab_size, VAL_TOKENS[1024]) / VAL_DOCS


def synthetic_stream(n_docs, mean_len, sigma, vocab_size, seed, cap=None):
    """Documents of log-normal length, each BOS (1) then uniform tokens in [2, vocab): uint16."""
    lens = doc_lengths(n_docs, n_docs * mean_len, sigma, seed, cap)
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(2, vocab_size, int(lens.sum()), dtype=np.int64)
    tokens[np.concatenate([[0], np.cumsum(lens)[:-1]])] = 1
    return tokens.astype(np.uint16)


def write_shards(out_dir, vocab_size, ctx):
    """fineweb_train_000000.bin (train) and fineweb_val_000000.bin (the eval sample) with data/fineweb.write_shard."""
    sys.path.insert(0, str(REPO / "data"))
    import fineweb  # noqa: E402
    sizes = ctx["sizes"]
    out_dir.mkdir(parents=True, exist_ok=True)
    mean = mean_doc_tokens(ctx, vocab_size)
    n_train = max(int(sizes["train_shard_tokens"] / mean), 1)
    fineweb.write_shard(out_dir / "fineweb_train_000000.bin",
                        synthetic_stream(n_train, mean, sizes["doc_sigma"], vocab_size, 1))
    val = synthetic_stream(sizes["eval_docs"], mean, sizes["doc_sigma"], vocab_size, 2)
    fineweb.write_shard(out_dir / "fineweb_val_000000.bin", val)
    return {"train_tokens": int(fineweb.read_shard_header(out_dir / "fineweb_train_000000.bin")),
            "val_tokens": int(len(val)), "val_docs": sizes["eval_docs"], "mean_doc_tokens": mean,
            "doc_sigma": sizes["doc_sigma"]}


TOKENIZER_DIRS = (REPO / "shared" / "tokenizers", REPO.parent / "shared" / "tokenizers", REPO / "data" / "tokenizers")


def find_tokenizer(vocab_size, out_dir, dirs=TOKENIZER_DIRS):
    """(path, source): the challenge tokenizer copied into out_dir, else a word-level SentencePiece model of exactly
    vocab_size pieces trained on synthetic text, else (None, why)."""
    name = TOKENIZERS.get(vocab_size, f"fineweb_{vocab_size}_bpe.model")
    out_dir.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        if (d / name).is_file():
            shutil.copy(d / name, out_dir / name)
            return str(out_dir / name), f"copied from {d}"
    try:
        import random
        import sentencepiece as spm
        rng = random.Random(vocab_size)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                 for _ in range(3 * vocab_size)]
        lines = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2 * vocab_size)]
        path = out_dir / f"synthetic_{vocab_size}.model"
        with open(path, "wb") as f:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=vocab_size,
                                           model_type="word", byte_fallback=True, unk_id=0, bos_id=1, eos_id=-1,
                                           pad_id=-1, minloglevel=2)
        if spm.SentencePieceProcessor(model_file=str(path)).vocab_size() != vocab_size:
            raise ValueError("wrong vocabulary size")
        return str(path), "synthetic word-level SentencePiece model (no challenge tokenizer found)"
    except Exception as e:  # noqa: BLE001 - the parts fall back to synthetic byte counts
        return None, f"none ({type(e).__name__}: {e}); synthetic byte counts"


# ====================================================================================================
# Orchestration
# ====================================================================================================


def preset_env(preset, mode, scratch, data, tokenizer, settings):
    env = {"PRESET": preset}
    if mode == "cpu":
        env.update(CPU_COMMON)
        env.update(CPU_PRESET[preset])
    else:
        env["DEVICE"] = "cuda"
    env.update(CHECK_ENV)
    env.update({"DATA_PATH": str(data), "TOKENIZER_PATH": tokenizer or str(scratch / "no_tokenizer.model"),
                "RUN_ID": f"gpu_check_{preset}"})
    for key, value in settings:
        if key.split(":")[0] in PRESET_NAMES and ":" in key:
            p, key = key.split(":", 1)
            if p != preset:
                continue
        env[key] = value
    return env


def preset_vocab(preset, mode, settings):
    """VOCAB_SIZE a preset runs with (env-free: the preset table is read from the trainer at part time)."""
    vocab = {"seed": 1024, "record": 8192}[preset] if mode == "full" else int(CPU_COMMON["VOCAB_SIZE"])
    for key, value in settings:
        if key in ("VOCAB_SIZE", f"{preset}:VOCAB_SIZE"):
            vocab = int(value)
    return vocab


def run_parts(ctx, names, out, deadline, overrides):
    """Runs each part as `gpu_check.py --part NAME` with its own time limit, in order, within the deadline."""
    results, logs = {}, out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(ctx["scratch"]) / "inductor_cache")  # cold, as a fresh run
    env["PYTHONUNBUFFERED"] = "1"
    ctx_path = Path(ctx["scratch"]) / "ctx.json"
    ctx_path.write_text(json.dumps(ctx, indent=1))
    grace = ctx["sizes"]["grace_s"]
    for k, name in enumerate(names):
        left = deadline - time.monotonic() - 15 * (len(names) - k - 1)
        requested = float(overrides.get(name, ctx["sizes"]["budgets"].get(name, 120)))
        limit = min(requested, left - grace)
        result_path = Path(ctx["scratch"]) / "parts" / f"{name}.json"
        result_path.parent.mkdir(exist_ok=True)
        log_path = logs / f"{name}.log"
        entry = {"ok": False, "timeout_s": round(limit, 1), "timed_out": False, "rc": None, "error": None,
                 "log": f"logs/{name}.log", "seconds": 0.0}
        results[name] = (entry, {})
        if limit < min(10.0, requested):
            entry["error"] = f"skipped: the total deadline ({ctx['sizes']['total_s']:.0f} s) left {max(left, 0):.0f} s"
            print(f"[gpu_check] {name}: {entry['error']}", flush=True)
            continue
        print(f"[gpu_check] {name} (limit {limit:.0f} s) ...", flush=True)
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--part", name, "--ctx",
                                     str(ctx_path), "--result", str(result_path)], cwd=ctx["scratch"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                entry["rc"] = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                entry["timed_out"] = True
                stop_group(proc, grace)
                entry["rc"] = proc.returncode
        entry["seconds"] = round(time.monotonic() - t0, 2)
        data = json.loads(result_path.read_text()) if result_path.exists() else {}
        part_error, completed = data.pop("error", None), data.pop("completed", False)
        entry["ok"] = (entry["rc"] == 0 and not entry["timed_out"]) or (completed and not part_error)
        if not entry["ok"]:
            tail = log_path.read_text(errors="replace")[-2500:] if log_path.exists() else ""
            why = f"timed out after {limit:.0f} s" if entry["timed_out"] else f"exit code {entry['rc']}"
            detail = (part_error or tail).strip()
            entry["error"] = f"{why}: {detail.splitlines()[-1] if detail else 'no output'}\n{detail}"
        sub_errors = {k: v["error"] for k, v in data.items() if isinstance(v, dict) and "error" in v}
        if sub_errors:
            entry["partial_errors"] = {k: v.strip().splitlines()[-1] for k, v in sub_errors.items()}
        status = "ok" if entry["ok"] else entry["error"].splitlines()[0]
        print(f"[gpu_check] {name}: {status} ({entry['seconds']:.0f} s)", flush=True)
        results[name] = (entry, data)
    return results


def stop_group(proc, grace):
    """Ends the part's process group (started in a session of its own): SIGTERM, which the part turns into writing
    what it has measured, then after `grace` seconds SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def assemble(ctx, results, data_info, t_start, install):
    info = results.get("info", ({}, {}))[1]
    report = {"tool": "tools/gpu_check.py", "format": 1, "mode": ctx["mode"],
              "time": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": info.get("device", "unknown"), "torch": info.get("torch"), "info": info,
              "install": install, "data": data_info, "presets": {}, "parts": {},
              "total_s": round(time.monotonic() - t_start, 1)}
    for name, (entry, data) in results.items():
        report["parts"][name] = entry
        if name == "info":
            continue
        preset, kind = name.split(".")
        section = dict(data)
        if not entry["ok"]:
            section["error"] = entry["error"]
        node = report["presets"].setdefault(preset, {"config": ctx["presets"][preset]["env"]})
        if kind == "phased":  # its own part (its own time limit), reported with the other eval figures
            phased = section.pop("ttt_phased", {})
            phased.update({k: v for k, v in section.items() if k not in phased})
            node.setdefault("eval", {})["ttt_phased"] = phased
        else:
            node.setdefault(kind, {}).update(section)
    for preset, node in report["presets"].items():
        ev = node.get("eval")
        if not ev or "ttt_mode" not in ev:
            continue
        own = f"ttt_chunk_{ev.get('ttt_optimizer', 'muon')}" if ev["ttt_mode"] == "chunk" else "ttt_phased"
        ev["ttt_projected_from"] = own
        ttt_s = get(ev, f"{own}.projected_s_8xh100")
        if ttt_s is not None:
            total = ttt_s + (ev.get("roundtrip_projected_s_8xh100") or 0.0)
            ev.update({"ttt_projected_s_8xh100": ttt_s, "eval_projected_total_s_8xh100": total,
                       "eval_budget_s": 600.0, "within_600s": total <= 600.0,
                       "eval_projected_note": "roundtrip (eval_full) + the preset's own TTT, as run_eval_phase runs "
                                              "them with TTT on; compile included"})
    report["ok"] = all(e["ok"] for e, _ in results.values())
    return report


def fmt(v, digits=None):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if digits is not None:
            return f"{v:,.{digits}f}"
        if v != 0 and (abs(v) >= 1e7 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.2f}" if abs(v) >= 10 else f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


ROWS = [  # (label, section.key, digits)
    ("train: compile s (first step - steady)", "train.compile_s", 1),
    ("train: tokens per step (TRAIN_BATCH_TOKENS)", "train.tokens_per_step", None),
    ("train: ms/step, 1 GPU, gradient accumulation 8", "train.ms_per_step", 1),
    ("train:   before the loops switch on", "train.ms_per_step_pre_loop", 1),
    ("train:   after the loops switch on", "train.ms_per_step_post_loop", 1),
    ("train:   compile s when the loops switch on", "train.compile_s_post_loop", 1),
    ("train: tokens/s per GPU", "train.tokens_per_s", 0),
    ("train: MFU (6N + attention, dense bf16 peak)", "train.mfu", 3),
    ("train: peak memory GiB", "train.peak_mem_gib", 1),
    ("train: attention kernel", "train.attention", None),
    ("train: graph breaks / recompiles", None, None),
    ("train: Newton-Schulz ms per step (1 GPU)", "train.newton_schulz_ms_per_step", 2),
    ("train: Newton-Schulz ms per step (a rank of 8)", "train.newton_schulz_ms_per_rank_8gpu", 2),
    ("train: Hessian collection s (GPTQ_CALIB_BATCHES)", "train.hessian_s", 2),
    ("train: projected steps in 600 s on 8xH100", "train.projected_steps_600s_8xh100", 0),
    ("train: reference steps (#1089 / record)", "train.reference_steps", None),
    ("eval: sliding tokens/s", "eval.sliding_tokens_per_s", 0),
    ("eval: sliding, projected s on 8xH100", "eval.sliding_projected_s_8xh100", 1),
    ("eval: roundtrip, projected s on 8xH100", "eval.roundtrip_projected_s_8xh100", 1),
    ("eval: chunk TTT muon tokens/s", "eval.ttt_chunk_muon.tokens_per_s", 0),
    ("eval: chunk TTT muon, projected s", "eval.ttt_chunk_muon.projected_s_8xh100", 1),
    ("eval: chunk TTT sgd tokens/s", "eval.ttt_chunk_sgd.tokens_per_s", 0),
    ("eval: chunk TTT sgd, projected s", "eval.ttt_chunk_sgd.projected_s_8xh100", 1),
    ("eval: phased TTT row-tokens/s", "eval.ttt_phased.row_tokens_per_s", 0),
    ("eval: phased TTT compile s (all row lengths)", "eval.ttt_phased.compile_s", 1),
    ("eval: phased TTT, projected s", "eval.ttt_phased.projected_s_8xh100", 1),
    ("eval: the preset's TTT, projected s on 8xH100", "eval.ttt_projected_s_8xh100", 1),
    ("eval: roundtrip + TTT, projected s (budget 600)", "eval.eval_projected_total_s_8xh100", 1),
    ("quant: quantize_model s", "quant.quantize_s", 1),
    ("quant: GPTQ s (inside)", "quant.gptq_s", 1),
    ("quant: total bytes (artifact + code)", "quant.total_bytes", None),
    ("quant: fits / compressor", None, None),
]


def table(report):
    presets = report["presets"]
    lines = [f"# gpu_check: {report['device']} ({report['mode']}), torch {report['torch']}, {report['time']}", "",
             "| metric | seed | record |", "| --- | ---: | ---: |"]
    for label, path, digits in ROWS:
        cells = []
        for p in PRESET_NAMES:
            d = presets.get(p, {})
            if label.startswith("train: graph breaks"):
                v = get(d, "train.dynamo_post_loop") or get(d, "train.dynamo_pre_loop") or get(d, "train.dynamo")
                cells.append(f"{v['graph_breaks']} / {v['recompiles']}" if v else "–")
            elif label.startswith("quant: fits"):
                q = d.get("quant", {})
                cells.append(f"{fmt(q.get('fits'))} / {q.get('compressor', '–')}" if q else "–")
            else:
                cells.append(fmt(get(d, path), digits))
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "| part | status | seconds | limit |", "| --- | --- | ---: | ---: |"]
    for name, e in report["parts"].items():
        status = "ok" if e["ok"] else (e["error"] or "failed").splitlines()[0][:100]
        if e.get("partial_errors"):
            status += "; partial: " + ", ".join(f"{k}" for k in e["partial_errors"])
        lines.append(f"| {name} | {status} | {e['seconds']:.0f} | {e['timeout_s']:.0f} |")
    lines += ["", f"total {report['total_s']:.0f} s; projections are linear from this card (no H200->H100 "
              f"correction, no communication); FLOPs = 6N + 12*L_v*T*d per token."]
    return "\n".join(lines) + "\n"


def read_install(out):
    path = out / "install.tsv"
    if not path.exists():
        return None
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return {r[0]: (r[1] if len(r) > 1 else "?") for r in rows}


def orchestrate(args):
    t_start = time.monotonic()
    mode = "cpu" if args.cpu else "full"
    sizes = copy.deepcopy(SIZES[mode])
    for key in ("steps", "warmup"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if args.total_s:
        sizes["total_s"] = args.total_s
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = [tuple(s.split("=", 1)) for s in args.set]
    names = args.parts.split(",") if args.parts else list(sizes["parts"])
    unknown = [n for n in names if n not in ALL_PARTS]
    if unknown:
        sys.exit(f"error: unknown part(s) {', '.join(unknown)}; parts: {', '.join(ALL_PARTS)}")
    overrides = dict((s.split("=", 1)[0], float(s.split("=", 1)[1])) for s in args.part_timeout)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        ctx = {"mode": mode, "trainer": str(Path(args.trainer).resolve()), "scratch": str(scratch), "sizes": sizes,
               "peak_tflops": args.peak_tflops, "presets": {}}
        data_info, made = {}, {}
        for preset in PRESET_NAMES:
            vocab = preset_vocab(preset, mode, settings)
            if vocab not in made:
                data_dir = scratch / f"data_{vocab}"
                info = write_shards(data_dir, vocab, ctx)
                tok, tok_source = find_tokenizer(vocab, scratch / "tokenizers")
                made[vocab] = (data_dir, tok)
                data_info[f"sp{vocab}"] = dict(info, tokenizer=tok_source, synthetic=True)
            data_dir, tok = made[vocab]
            ctx["presets"][preset] = {"env": preset_env(preset, mode, scratch, data_dir, tok, settings)}
        results = run_parts(ctx, names, out, t_start + sizes["total_s"], overrides)
        report = assemble(ctx, results, data_info, t_start, read_install(out))
    finally:
        if args.keep_scratch:
            print(f"[gpu_check] scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(table(report))
    print(table(report))
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
    return 0 if report["ok"] else 3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny config on the CPU (CI), same code path")
    ap.add_argument("--out", default=".gpu_check", help="output directory (default .gpu_check)")
    ap.add_argument("--parts", help=f"comma list (default {','.join(PARTS)}; --cpu adds seed.phased)")
    ap.add_argument("--set", action="append", default=[], metavar="[PRESET:]KEY=VALUE",
                    help="a trainer setting for both presets, or one (record:ATTN_KERNEL=flex); repeatable")
    ap.add_argument("--steps", type=int, help="timed training steps per phase (full 20, cpu 3)")
    ap.add_argument("--warmup", type=int, help="untimed warm-up steps per phase, the first compiles (full 2, cpu 1)")
    ap.add_argument("--total-s", type=float, help="total deadline in seconds (full 480, cpu 300)")
    ap.add_argument("--part-timeout", action="append", default=[], metavar="PART=SECONDS",
                    help="a part's own time limit (defaults: see SIZES)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak for MFU (default: by card name)")
    ap.add_argument("--trainer", default=str(REPO / "train_gpt_human.py"), help="the trainer file to check")
    ap.add_argument("--keep-scratch", action="store_true", help="keep the scratch directory (data, snapshots)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.part:  # inside a part's own process
        signal.signal(signal.SIGTERM, on_sigterm)
        ctx = json.loads(Path(args.ctx).read_text())
        try:
            run_part(args.part, ctx, args.result)
            res = Result(args.result)
            if Path(args.result).exists():
                res.data = json.loads(Path(args.result).read_text())
            res.put("completed", True)  # a SIGTERM during the interpreter's exit does not undo the measurements
        except BaseException as e:
            res = Result(args.result)
            if Path(args.result).exists():
                res.data = json.loads(Path(args.result).read_text())
            res.put("error", error_text(e))
            traceback.print_exc()
            return 1
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
