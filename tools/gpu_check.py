#!/usr/bin/env python3
"""The one-GPU check: the artifact train_gpt.py itself, run short on synthetic full-size shards (100M-token train
shard, log-normal documents each opened by BOS_ID=1), every figure read from the trainer's own log lines.

    bash tools/gpu_check.sh OUT          # full size, one CUDA GPU (.whl/*.whl installed offline first)
    bash tools/gpu_check.sh --cpu OUT    # the same driver, a tiny model on the CPU (CI)
    python3 tools/gpu_check.py --dry-run --out OUT   # a fake clock and a fake trainer: the budgets and the JSON
    python3 tools/gpu_check.py --out OUT --parts seed --set record:ATTN_KERNEL=flex --budget seed.train=200

Every part is one process, `python3 train_gpt.py` at world size 1 with GRAD_ACCUM_STEPS=8 (one rank of 8xH100), set
through Hyperparameters' variables only, ended at its own log line or its own time limit: train (short ITERATIONS,
TRAIN_LOG_EVERY=1; until `snapshot:saved`), quant (SNAPSHOT loaded, the record's with AWQ_GROUPS=1; until `Total
submission size`: the artifact is on disk), ttt and eval (EVAL_ARTIFACT: only the eval phase, the preset's TTT or the
sliding window; until `eval_phase_time`).  A part whose budget no longer fits the deadline, or whose snapshot or
artifact is missing, is skipped; OUT/gpu_check.json and .md are rewritten after every part.  Compile seconds come
from `compile:warmup seconds:X`.  Lines the trainer does not log yet are read when present (`gpu:<name> …`,
`peak_memory phase:<p> allocated_mib:A …`, `quant:done time:Xs …`, `ttt:segment … row_tokens_per_s:R`); until then
the CPU's peak memory is the process's max RSS and packing time the gap between its log lines.
"""
import argparse
import datetime
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRESETS, KINDS = ("record", "seed"), ("train", "quant", "ttt", "eval")
PARTS = [f"{p}.{k}" for p in PRESETS for k in KINDS]  # the run order: the record first
END = {"train": "snapshot:saved", "quant": "Total submission size", "ttt": "eval_phase_time",
       "eval": "eval_phase_time"}  # the log line that ends each part
NEEDS = {"quant": "train", "ttt": "quant", "eval": "quant"}  # the snapshot; the artifact
VOCAB = {"seed": 1024, "record": 8192}
VAL_FULL = {1024: 62_021_846, 8192: 40_500_000}  # validation tokens per tokenizer (sp8192: approximate)
VAL_DOCS, GPUS, TRAIN_S, EVAL_S = 50_000, 8, 600.0, 600.0
REFERENCE_STEPS = {"seed": 6291, "record": 4931}  # 8xH100, 600 s: PR #1089 (the seed) and the accepted record
LOOP_ENABLE_AT, TTT_PREFIX_DOCS = 0.35, 2500  # the trainer's constants, for the projections
ASSUMPTIONS = {
    "val_tokens_full": {"sp1024": VAL_FULL[1024], "sp8192": VAL_FULL[8192], "docs": VAL_DOCS,
                        "note": "sp8192's count is approximate (about 40.5M)"},
    "train": "steps in 600 s - GPTQ_RESERVE_MS on 8xH100 = that time / (ms_per_step / 8): linear in this card's speed, "
             "no communication, no H200->H100 correction; TRAIN_SEQ_SCHEDULE off (every step at TRAIN_SEQ_LEN, the "
             "dearest stage), late QAT off; the record's ms_per_step weighs the loop phases by time (35 % / 65 %)",
    "eval": "full validation set / 8 ranks / the tokens per second measured on the sample (same log-normal document "
            "lengths); phased TTT adds its global phase (TTT_PREFIX_DOCS documents of mean length at the train part's "
            "tokens/s / 8), which the short sample never reaches; TTT's warm-up compile is untimed, as in a real run",
}
SIZES = {  # per mode: the deadline, the budgets (seconds), data and settings
    "full": {"deadline": 480, "setup": 20, "vocab": VOCAB, "train_tokens": 100_000_000, "val_tokens": 600_000,
             "mean_doc": None,
             "budgets": {"record.train": 140, "record.quant": 130, "record.ttt": 140, "record.eval": 50,
                         "seed.train": 120, "seed.quant": 120, "seed.ttt": 60, "seed.eval": 40},
             "env": {"DEVICE": "cuda", "VAL_MAX_TOKENS": "300001"},
             "preset_env": {"record": {"ITERATIONS": "30", "MAX_WALLCLOCK_SECONDS": "64", "WARMUP_STEPS": "2"},
                            "seed": {"ITERATIONS": "30", "MAX_WALLCLOCK_SECONDS": "60", "WARMUP_STEPS": "1"}}},
    "cpu": {"deadline": 600, "setup": 20, "vocab": {"record": 1024, "seed": 1024}, "train_tokens": 200_000,
            "val_tokens": 8192, "mean_doc": 100, "budgets": {name: 60 for name in PARTS},
            "env": {"DEVICE": "cpu", "COMPILE": "0", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                    "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "8192", "EVAL_STRIDE": "64",
                    "EVAL_BATCH_SEQS": "16", "GPTQ_CALIB_BATCHES": "4", "TTT_CHUNK_TOKENS": "512",
                    "TTT_DOC_BATCH": "8", "TARGET_BYTES": "2000000", "VAL_MAX_TOKENS": "2049", "ITERATIONS": "10",
                    "MAX_WALLCLOCK_SECONDS": "0", "OMP_NUM_THREADS": "1"},
            "preset_env": {"record": {"NUM_LAYERS": "4", "LOOP_START": "1", "LOOP_END": "2", "PARALLEL_START": "3",
                                      "WARMUP_STEPS": "2", "TRAIN_BATCH_TOKENS": "4096", "ITERATIONS": "8"},
                           "seed": {"NUM_LAYERS": "2", "ENGRAM_BUCKETS": "256", "VE_DIM": "16", "WARMUP_STEPS": "1"}}},
}
COMMON_ENV = {"GRAD_ACCUM_STEPS": "8", "TRAIN_LOG_EVERY": "1", "TRAIN_SEQ_SCHEDULE": "",
              "QAT_THRESHOLD": "0", "EVAL_BUDGET_SECONDS": "1000000"}
PART_ENV = {"train": {}, "quant": {"COMPILE": "0"},  # packing compiles nothing; the prequant eval runs eager
            "ttt": {"TTT_ENABLED": "1"}, "eval": {"TTT_ENABLED": "0"}}  # TTT off: the sliding window instead
PRESET_PART_ENV = {"record.quant": {"AWQ_GROUPS": "1"}}  # AWQ-lite (#2014's one group), probed on the device


# ---------------------------------------------------------------------------------------------------- log parsing

def fields(line):
    return dict(f.split(":", 1) for f in (line or "").split() if ":" in f)


def number(text):
    m = re.match(r"-?[\d.]+(e-?\d+)?", (text or "").strip())
    return float(m.group(0)) if m else None


def last(lines, prefix):
    """(seconds since the process started, line) of the last line starting with prefix, or (None, None)."""
    return next(((t, s) for t, s in reversed(lines) if s.startswith(prefix)), (None, None))


def config(lines):
    return dict(kv.split("=", 1) for kv in (last(lines, "config:")[1] or "").split()[1:] if "=" in kv)


def seconds_of(line, key="eval_time"):
    """A `key:Tms` field in seconds, None when absent."""
    value = number(fields(line).get(key))
    return None if value is None else value / 1000


def graphs(lines, phase):
    """Graphs compiled by the end of `phase` (rank 0's), from `compile:<phase> graphs_per_rank:a,b,…`."""
    f = fields(last(lines, f"compile:{phase} ")[1])
    return number((f.get("graphs_per_rank") or f.get("graphs") or "").split(",")[0])


def steady(ms):
    """Mean of the steps' milliseconds, leaving out the first (lazy initialisation) when there are more."""
    ms = ms[1:] if len(ms) > 1 else ms
    return sum(ms) / len(ms) if ms else None


def peak_gib(lines, phase, rss_gib=None):
    _, line = last(lines, f"peak_memory phase:{phase} ")
    _, cuda = last(lines, "peak memory allocated:")
    if line:
        return number(fields(line)["allocated_mib"]) / 1024
    return number(cuda.split("allocated:")[1]) / 1024 if cuda and phase == "train" else rss_gib


def train_figures(preset, lines, rss_gib=None):
    cfg, f = config(lines), {}
    steps = [number(fields(s)["train_time"]) for _, s in lines if s.startswith("step:") and "train_loss:" in s]
    if not steps:
        raise ValueError("no `step:S/N train_loss:… train_time:…` line")
    ms = [b - a for a, b in zip([0.0] + steps, steps)]
    _, switch = last(lines, "layer_loop:enabled")
    if switch:  # step S's line comes before step S + 1, the first looped one
        s = int(fields(switch)["step"])
        pre, post = steady(ms[:s]), steady(ms[s:])
        f.update(ms_per_step_pre_loop=pre, ms_per_step_post_loop=post, loop_switch_step=s,
                 ms_per_step=1 / (LOOP_ENABLE_AT / pre + (1 - LOOP_ENABLE_AT) / post) if pre and post else None)
    else:
        f["ms_per_step"] = steady(ms)
    t_start, _ = last(lines, "world_size:")
    t_first = next(t for t, s in lines if s.startswith("step:"))
    _, warm = last(lines, "compile:warmup ")
    compile_s = number(fields(warm).get("seconds"))
    if compile_s is None and t_start is not None and f["ms_per_step"]:  # the warm-up's wall time less its steps
        compile_s = max(t_first - t_start - (ms[0] + int(cfg.get("warmup_steps", 0)) * f["ms_per_step"]) / 1000, 0.0)
    tokens, reserve = int(cfg.get("train_batch_tokens", 786432)), float(cfg.get("gptq_reserve_ms", 0)) / 1000
    attention = last(lines, "attention:")[1]
    f.update(steps=len(steps), step_ms=ms, compile_s=compile_s,
             compile_s_source="compile:warmup line" if warm else "estimate: line times less the warm-up steps",
             tokens_per_step=tokens, world_size=1, grad_accum_steps=int(cfg.get("grad_accum_steps", 8)),
             tokens_per_s=tokens / (f["ms_per_step"] / 1000) if f["ms_per_step"] else None,
             peak_mem_gib=peak_gib(lines, "train", rss_gib),
             peak_mem_kind="torch.cuda.max_memory_allocated" if last(lines, "peak memory")[1] else "process max RSS",
             attention=attention.split()[0].split(":", 1)[1] if attention else None,
             hessian_s=seconds_of(last(lines, "gptq:hessians")[1], "time"),
             graphs=graphs(lines, "train"), reference_steps=REFERENCE_STEPS[preset])
    if f["ms_per_step"]:
        f["projected_steps_600s_8xh100"] = (TRAIN_S - reserve) / (f["ms_per_step"] / 1000 / GPUS)
        f["projected_vs_reference"] = f["projected_steps_600s_8xh100"] / REFERENCE_STEPS[preset]
    return f


def quant_figures(lines):
    (t_pre, _), (t_ser, ser) = last(lines, "final_prequant_exact"), last(lines, "Serialized model")
    _, done = last(lines, "quant:done")
    total, target = int(number(last(lines, "Total submission size")[1].split(":")[-1])), int(
        config(lines).get("target_bytes", 16_000_000))
    _, sdclip = last(lines, "quant:sdclip factor:")
    _, awq = last(lines, "quant:awq ")
    return {"quantize_s": number(fields(done)["time"]) if done else (t_ser - t_pre if t_pre is not None else None),
            "quantize_s_source": "quant:done line" if done else "line times (final_prequant_exact -> Serialized)",
            "artifact_bytes": int(number(ser.split(":")[-1])), "total_bytes": total, "target_bytes": target,
            "fits": total <= target, "sdclip_factor": number(fields(sdclip).get("factor")),
            "sizings": 1 + sum("sdclip missed" in s for _, s in lines), "awq": awq[len("quant:awq "):] if awq else None,
            "prequant_s": t_pre - (last(lines, "snapshot:loaded")[0] or 0) if t_pre is not None else None}


def predictions(lines):
    return int(fields(last(lines, "val_tokens:")[1])["val_tokens"]) - 1


def eval_figures(lines, vocab):
    _, slide = last(lines, "final_int6_sliding_window_exact")
    rate = predictions(lines) / seconds_of(slide)
    return {"sample_predictions": predictions(lines), "sliding_s": seconds_of(slide), "sliding_tokens_per_s": rate,
            "sliding_projected_s_8xh100": VAL_FULL[vocab] / GPUS / rate,
            "roundtrip_s": seconds_of(last(lines, "final_int6_roundtrip_exact")[1]),
            "val_bpb_sliding": number(fields(slide)["val_bpb"])}


def ttt_figures(lines, vocab, train_tokens_per_s):
    cfg, final = config(lines), fields(last(lines, "final_int6_ttt_exact")[1])
    start = fields(last(lines, "ttt:start")[1])
    seconds, p = number(final["eval_time"]) / 1000, predictions(lines)
    out = {"mode": cfg.get("ttt_mode"), "seconds": seconds, "tokens_per_s": p / seconds,
           "adapted": final.get("batches_adapted") or final.get("chunks_adapted"), "val_bpb": number(final["val_bpb"]),
           "budget_stopped": any(s.startswith("ttt:budget") for _, s in lines),
           "steady_projected_s_8xh100": VAL_FULL[vocab] / GPUS / (p / seconds),
           "segments": [{"time_s": number(fields(s)["time"]), "row_tokens_per_s": number(fields(s).get(
               "row_tokens_per_s"))} for _, s in lines if s.startswith("ttt:segment ")],
           "compile_s": number((last(lines, "ttt:warmup compile")[1] or "untimed:").split("untimed:")[1]),
           "graphs_after_warmup": graphs(lines, "eval_warmup"), "graphs": graphs(lines, "eval"),
           "roundtrip_s_first": seconds_of(last(lines, "final_int6_roundtrip_exact")[1]),
           "peak_mem_gib": peak_gib(lines, "ttt")}
    global_s = 0.0
    if out["mode"] == "phased" and start:
        rtpp = number(start.get("row_tokens_per_prediction"))
        out.update(sample_docs=int(start["docs"]), row_tokens_per_prediction=rtpp,
                   row_tokens_per_s=rtpp * p / seconds if rtpp else None, global_phase_s_est=None)
        if train_tokens_per_s:
            global_s = out["global_phase_s_est"] = (TTT_PREFIX_DOCS * int(cfg.get("ttt_phases", 1)) * VAL_FULL[vocab] /
                                                    VAL_DOCS / GPUS / train_tokens_per_s)
    out["projected_s_8xh100"] = out["steady_projected_s_8xh100"] + global_s
    return out


# ---------------------------------------------------------------------------------------------------- data

def synthetic_stream(n_tokens, mean_doc, vocab, seed):
    """Documents of log-normal length (sigma 1, at least 8 tokens), each BOS (1) then uniform tokens in [2, vocab)."""
    rng = np.random.default_rng(seed)
    lens = np.maximum(rng.lognormal(math.log(mean_doc) - 0.5, 1.0, int(2 * n_tokens / mean_doc) + 8), 8).astype(int)
    starts = np.cumsum(np.concatenate([[0], lens]))
    tokens = rng.integers(2, vocab, n_tokens, dtype=np.uint16)
    tokens[starts[starts < n_tokens]] = 1
    return tokens


def find_tokenizer(vocab, out_dir):
    """(path, source): the challenge's tokenizer when one is here, else a word-level SentencePiece model of `vocab`
    pieces trained on synthetic words (only the byte accounting reads it; speed does not depend on it)."""
    name = f"fineweb_{vocab}_bpe.model"
    for d in (REPO / "shared" / "tokenizers", REPO.parent / "shared" / "tokenizers", REPO / "data" / "tokenizers"):
        if (d / name).is_file():
            return str(d / name), f"found in {d}"
    import random
    import sentencepiece as spm
    rng = random.Random(vocab)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(3 * vocab)]
    with open(out_dir / f"synthetic_{vocab}.model", "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=(" ".join(rng.choices(words, k=40)) for _ in range(2 * vocab)),
                                       model_writer=f, vocab_size=vocab, model_type="word", byte_fallback=True,
                                       unk_id=0, bos_id=1, eos_id=-1, pad_id=-1, minloglevel=2)
    return f.name, "synthetic word-level SentencePiece model"


def write_data(scratch, vocab, sizes):
    sys.path.insert(0, str(REPO / "data"))
    import fineweb
    d, mean = scratch / f"data_sp{vocab}", sizes["mean_doc"] or VAL_FULL[vocab] / VAL_DOCS
    fineweb.write_shard(d / "fineweb_train_000000.bin", synthetic_stream(sizes["train_tokens"], mean, vocab, 1))
    fineweb.write_shard(d / "fineweb_val_000000.bin", synthetic_stream(sizes["val_tokens"], mean, vocab, 2))
    tokenizer, source = find_tokenizer(vocab, scratch)
    return d, tokenizer, {"train_tokens": sizes["train_tokens"], "val_tokens": sizes["val_tokens"],
                          "mean_doc_tokens": mean, "doc_lengths": "log-normal, sigma 1", "tokenizer": source}


# ---------------------------------------------------------------------------------------------------- processes

class Proc:
    """A trainer process in a session of its own, its output read line by line on a thread."""

    def __init__(self, cmd, env, cwd):
        self.p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", start_new_session=True)
        self.lines, self.rc, self.rss_gib = queue.Queue(), None, None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout):
        """A line; "" when none came within timeout; None at the end of the output."""
        try:
            return self.lines.get(timeout=max(timeout, 0.01))
        except queue.Empty:
            return ""

    def stop(self, grace):
        """Waits up to grace seconds for the exit, then SIGTERM, then SIGKILL to the whole group; keeps rc and RSS."""
        for sig, wait in ((None, grace), (signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            if self.rc is not None:
                break
            if sig:
                os.killpg(self.p.pid, sig)  # the leader, unreaped, keeps the group alive: this cannot miss
            for _ in range(int(wait * 20) + 1):
                pid, status, usage = os.wait4(self.p.pid, os.WNOHANG)
                if pid:
                    self.p.returncode = self.rc = os.waitstatus_to_exitcode(status)
                    self.rss_gib = usage.ru_maxrss / 2**20  # KiB on Linux
                    break
                time.sleep(0.05)
        try:
            os.killpg(self.p.pid, signal.SIGKILL)  # compile workers or children left behind
        except ProcessLookupError:
            pass


class FakeClock:
    now = 0.0
    __call__ = lambda self: self.now  # noqa: E731


class FakeProc:
    """--dry-run: a trainer that prints a part's log lines on the fake clock, in 60 % of its budget; `fail` "hang" or
    "crash": it prints all but the last line, then hangs or exits."""

    def __init__(self, clock, name, budget, fail):
        body = fake_lines(*name.split("."))
        if fail:
            body = body[:-1] + ["RuntimeError: forced failure (dry run)"] * (fail == "crash")
        self.clock, self.rc, self.rss_gib, self.fail = clock, None, 1.0, fail
        self.script = [(clock() + 0.6 * budget * (i + 1) / len(body), s) for i, s in enumerate(body)]
        self.script += [(math.inf if fail == "hang" else clock() + 0.6 * budget, None)]

    def next_line(self, timeout):
        if self.script[0][0] > self.clock.now + timeout:
            self.clock.now += timeout
            return ""
        self.clock.now, line = self.script.pop(0) if self.script[0][1] is not None else self.script[0]
        return line

    def stop(self, grace):
        self.rc = {None: 0, "crash": 1, "hang": -15}[self.fail]


def fake_lines(preset, kind):
    phased = preset == "record"
    head = ["code_sha256:0123456789abcdef python:3.12.0 torch:2.13.0",
            f"config: preset={preset} train_batch_tokens=786432 warmup_steps=2 gptq_reserve_ms=4000.0 "
            f"target_bytes=16000000 ttt_mode={'phased' if phased else 'chunk'} ttt_phases=1",
            "attention:fa3 doc_isolation:1 flash_builds:fa3", "val_tokens:300001 val_docs:370 train_shards:1"]
    steps = [f"step:{s}/30 train_loss:9.0 train_time:{1000 * s}ms step_avg:1000.00ms" for s in range(1, 31)]
    roundtrip = "final_int6_roundtrip_exact val_loss:9.0 val_bpb:3.0 eval_time:5000ms"
    return head + {"train": ["world_size:1 grad_accum_steps:8 device:cuda", *steps[:10],
                             *["layer_loop:enabled step:10 progress:0.350"] * phased, *steps[10:],
                             "training_done steps:30 train_time:30000ms",
                             "peak memory allocated: 61440 MiB reserved: 70000 MiB",
                             "compile:train graphs_per_rank:2 limit:64", "gptq:hessians batches:16 time:900ms",
                             "snapshot:saved x.pt"],
                   "quant": ["snapshot:loaded x.pt", "final_prequant_exact val_loss:9.0 val_bpb:3.0",
                             "quant:sdclip factor:1.000 calibration:1.0",
                             "Serialized model int6+brotli: 15900000 bytes", "Code size: 30000 bytes",
                             "Total submission size int6+brotli: 15930000 bytes"],
                   "ttt": [roundtrip, "ttt:warmup compile on random tokens, untimed: 60.0s row_tokens_per_s:1",
                           *["ttt:start mode:phased docs:370 batches:6 segments:[6] row_tokens_per_prediction:20"] *
                           phased, "ttt:segment 1/1 batches:6 adapted_here:6 time:25.0s",
                           "final_int6_ttt_exact val_loss:9.0 val_bpb:3.0 eval_time:25000ms "
                           f"{'batches' if phased else 'chunks'}_adapted:6/6",
                           "compile:eval graphs_per_rank:4 limit:64",
                           "eval_phase_time:25.0s"],
                   "eval": [roundtrip, "final_int6_sliding_window_exact val_loss:9.0 val_bpb:3.0 stride:64 "
                                       "eval_time:9000ms", "eval_phase_time:9.0s"]}[kind]


# ---------------------------------------------------------------------------------------------------- the driver

class Check:
    def __init__(self, args, clock=time.monotonic, spawn=Proc):
        self.args, self.clock, self.spawn, self.mode = args, clock, spawn, "cpu" if args.cpu else "full"
        self.sizes = SIZES[self.mode]
        self.budgets = dict(self.sizes["budgets"], **{k: float(v) for k, v in (b.split("=") for b in args.budget)})
        asked = {p for p in PARTS if any(p == s or p.startswith(s + ".") for s in args.parts.split(","))}
        for _ in range(2):  # a part's snapshot and artifact come from its preset's train and quant parts
            asked |= {f"{p.split('.')[0]}.{NEEDS[p.split('.')[1]]}" for p in asked if p.split(".")[1] in NEEDS}
        self.parts = [p for p in PARTS if p in asked]
        self.out, self.t0 = Path(args.out).resolve(), clock()
        self.deadline = self.t0 + (args.deadline or self.sizes["deadline"])
        self.report = {"tool": "tools/gpu_check.py", "format": 2, "mode": "dry-run" if args.dry_run else self.mode,
                       "time": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_name(self.mode),
                       "torch": None, "code_sha256": None, "ok": None, "deadline_s": self.deadline - self.t0,
                       "setup_s": None, "elapsed_s": 0.0, "assumptions": ASSUMPTIONS, "data": {},
                       "parts": {p: {"status": "pending", "budget_s": self.budgets[p], "seconds": None, "error": None,
                                     "log": None} for p in self.parts},
                       "presets": {p.split(".")[0]: {"vocab_size": self.vocab(p.split(".")[0])} for p in self.parts}}

    def vocab(self, preset):
        sets = [s.split("=", 1) for s in self.args.set]
        return int(next((v for k, v in reversed(sets) if k in ("VOCAB_SIZE", f"{preset}:VOCAB_SIZE")),
                        self.sizes["vocab"][preset]))

    def save(self):
        self.report["elapsed_s"] = round(self.clock() - self.t0, 1)
        for name, text in (("gpu_check.json", json.dumps(self.report, indent=1, default=str)),
                           ("gpu_check.md", table(self.report))):
            (self.out / (name + ".tmp")).write_text(text)
            os.replace(self.out / (name + ".tmp"), self.out / name)

    def env(self, name, data, tokenizer, scratch):
        preset, kind = name.split(".")
        ours = {**COMMON_ENV, **self.sizes["env"], **self.sizes["preset_env"][preset], "PRESET": preset,
                "VOCAB_SIZE": str(self.vocab(preset)), **PART_ENV[kind], **PRESET_PART_ENV.get(name, {})}
        for key, value in (s.split("=", 1) for s in self.args.set):
            if ":" not in key or key.split(":")[0] == preset:
                ours[key.split(":")[-1]] = value
        self.report["presets"][preset].setdefault("settings", {})[kind] = ours
        files = {"SNAPSHOT": str(scratch / f"{preset}_snapshot.pt")} if kind in ("train", "quant") else {
            "EVAL_ARTIFACT": str(scratch / "logs" / f"{preset}_quant_model.int6.ptz")}  # the quant part's artifact
        cache = self.out / "compile_cache"  # one for every part: a graph compiled once is loaded after
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        return {**env, "DATA_PATH": str(data), "TOKENIZER_PATH": str(tokenizer), "RUN_ID": f"{preset}_{kind}",
                "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                "TRITON_CACHE_DIR": str(cache / "triton"), **files, **ours}

    def figures(self, preset, kind, lines, rss_gib):
        node, vocab = self.report["presets"][preset], self.report["presets"][preset]["vocab_size"]
        if kind == "ttt":
            f = ttt_figures(lines, vocab, node.get("train", {}).get("tokens_per_s"))
            return {"ttt": f, "ttt_projected_s_8xh100": f["projected_s_8xh100"], "ttt_compile_s": f["compile_s"],
                    "within_600s": f["projected_s_8xh100"] <= EVAL_S}
        return {"train": lambda: train_figures(preset, lines, rss_gib), "quant": lambda: quant_figures(lines),
                "eval": lambda: eval_figures(lines, vocab)}[kind]()

    def finish(self, name, status, lines, seconds, error=None, rss_gib=None):
        """Records a part (its status, its figures from the log lines, or why not) and rewrites the JSON and table."""
        entry, (preset, kind) = self.report["parts"][name], name.split(".")
        entry.update(status=status, seconds=None if status == "skipped" else round(seconds, 1), error=error)
        node = self.report["presets"][preset].setdefault("eval" if kind == "ttt" else kind, {})
        if lines:
            head = fields(last(lines, "code_sha256:")[1])
            self.report["torch"] = self.report["torch"] or head.get("torch")
            self.report["code_sha256"] = self.report["code_sha256"] or head.get("code_sha256")
            _, gpu = last(lines, "gpu:")
            self.report["device"] = gpu.split(" memory_gib:")[0][4:] if gpu else self.report["device"]
            try:
                node.update(self.figures(preset, kind, lines, rss_gib))
            except Exception as e:  # noqa: BLE001 - a figure the log lacks is a finding, not a crash of the check
                entry["figures_error"] = f"{type(e).__name__}: {e}"
        if status != "ok":
            node[f"{kind}_error"] = error
        print(f"[gpu_check] {name}: {error.splitlines()[0] if error else status}" +
              (f" ({entry['seconds']:.0f} s)" if entry["seconds"] is not None else ""), flush=True)
        self.save()

    def run_part(self, name, env, cwd):
        """One trainer process, ended at the part's END line (ok), its exit (failed) or its budget (timeout)."""
        kind, start, lines, outcome = name.split(".")[1], self.clock(), [], None
        needs = NEEDS.get(kind) and f"{name.split('.')[0]}.{NEEDS[kind]}"
        if needs and self.report["parts"][needs]["status"] != "ok":
            return self.finish(name, "skipped", [], None, f"skipped: {needs} did not finish (no "
                                                          f"{'snapshot' if NEEDS[kind] == 'train' else 'artifact'})")
        if start + self.budgets[name] > self.deadline:
            return self.finish(name, "skipped", [], None, f"skipped: {self.deadline - start:.0f} s left before the "
                                                          f"deadline, it needs {self.budgets[name]:.0f} s; rerun with "
                                                          f"--parts {name}")
        self.report["parts"][name]["log"] = f"logs/{name}.log"
        proc = (self.spawn(self.clock, name, self.budgets[name], self.args.fail_map.get(name)) if self.args.dry_run
                else self.spawn([sys.executable, str(Path(self.args.trainer).resolve())], env, cwd))
        try:
            with open(self.out / "logs" / f"{name}.log", "w") as log:
                while outcome is None:
                    line = proc.next_line(min(1.0, start + self.budgets[name] - self.clock()))
                    if line:
                        lines.append((self.clock() - start, line))
                        log.write(f"[{lines[-1][0]:7.1f}] {line}\n")
                        log.flush()
                    if line is None:
                        proc.stop(5)
                        outcome = ("failed", f"failed: the trainer exited (rc {proc.rc}) before `{END[kind]}`")
                    elif line and line.startswith(END[kind]):
                        outcome = ("ok", None)
                    elif self.clock() >= start + self.budgets[name]:
                        outcome = ("timeout", f"timeout: no `{END[kind]}` line within {self.budgets[name]:.0f} s")
        except (KeyboardInterrupt, SystemExit):  # the check itself is stopped: record the part, end its process
            proc.stop(0)
            self.finish(name, "failed", lines, self.clock() - start, "failed: the check was stopped during this part")
            raise
        seconds = self.clock() - start
        proc.stop(15 if outcome[0] == "ok" and kind in ("ttt", "eval") else 0)  # train, quant: the run goes on; stop it
        for f in (Path(cwd) / "logs").glob(f"{name.replace('.', '_')}.txt"):
            shutil.copy(f, self.out / "logs" / f.name)  # the trainer's own logs/<RUN_ID>.txt
        error = outcome[1] and (outcome[1] + "\n" + "\n".join(s for _, s in lines[-25:])[-3000:]).strip()
        self.finish(name, outcome[0], lines, seconds, error, proc.rss_gib)

    def run(self):
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.save()
        scratch, data = Path(tempfile.mkdtemp(prefix="gpu_check_")), {}
        try:
            for node in self.report["presets"].values():
                if node["vocab_size"] not in data:
                    data[node["vocab_size"]] = (("", "", {}) if self.args.dry_run else
                                                write_data(scratch, node["vocab_size"], self.sizes))
                    self.report["data"][f"sp{node['vocab_size']}"] = data[node["vocab_size"]][2]
            if self.args.dry_run:
                self.clock.now += 0.5 * self.sizes["setup"]
            self.report["setup_s"] = round(self.clock() - self.t0, 1)
            self.save()
            for name in self.parts:
                directory, tokenizer, _ = data[self.report["presets"][name.split(".")[0]]["vocab_size"]]
                self.run_part(name, self.env(name, directory, tokenizer, scratch), scratch)
        except (KeyboardInterrupt, SystemExit):
            for name in [p for p, e in self.report["parts"].items() if e["status"] == "pending"]:
                self.finish(name, "skipped", [], None, "skipped: the check was stopped before this part")
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.report["ok"] = all(e["status"] in ("ok", "skipped") for e in self.report["parts"].values())
        self.save()
        print(table(self.report))
        return 0 if self.report["ok"] else 3


def device_name(mode):
    try:
        if mode == "full":
            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=20).stdout.splitlines()[0].strip()
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, IndexError, StopIteration, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------- the table

def get(d, path):
    for k in path.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def fmt(v, digits=1):
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "–"}[v]
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


ROWS = [("train: compile s before the clock", "train.compile_s", 1),
        ("train: ms/step, 1 GPU, accum 8", "train.ms_per_step", 1),
        ("train:   before the loops", "train.ms_per_step_pre_loop", 1),
        ("train:   after the loops", "train.ms_per_step_post_loop", 1),
        ("train: tokens/s per GPU", "train.tokens_per_s", 0), ("train: peak memory GiB", "train.peak_mem_gib", 1),
        ("train: attention kernel", "train.attention", 0), ("train: compiled graphs", "train.graphs", 0),
        ("train: Hessians s", "train.hessian_s", 2),
        ("train: projected steps in 600 s, 8xH100", "train.projected_steps_600s_8xh100", 0),
        ("train: reference steps (#1089 / record)", "train.reference_steps", 0),
        ("quant: quantize s (brotli-11 included)", "quant.quantize_s", 1),
        ("quant: total bytes", "quant.total_bytes", 0), ("quant: fits TARGET_BYTES", "quant.fits", 0),
        ("quant: AWQ-lite probe", "quant.awq", 0), ("eval: TTT warm-up compile s (untimed)", "eval.ttt_compile_s", 1),
        ("eval: sliding tokens/s", "eval.sliding_tokens_per_s", 0),
        ("eval: sliding, projected s on 8xH100", "eval.sliding_projected_s_8xh100", 1),
        ("eval: TTT tokens/s", "eval.ttt.tokens_per_s", 0),
        ("eval: TTT, projected s on 8xH100 (of 600)", "eval.ttt_projected_s_8xh100", 1)]


def table(r):
    lines = [f"# gpu_check: {r['device']} ({r['mode']}), torch {r['torch']}, code {r['code_sha256']}, {r['time']}",
             "", "| part | status | seconds | budget | note |", "| --- | --- | ---: | ---: | --- |"]
    for name, e in r["parts"].items():
        note = ((e["error"] or "").splitlines() or [e.get("figures_error") or ""])[0][:110]
        lines.append(f"| {name} | {e['status']} | {fmt(e['seconds'])} | {e['budget_s']:.0f} | {note} |")
    lines += ["", "| metric | record | seed |", "| --- | ---: | ---: |"]
    for label, path, digits in ROWS:
        cells = [fmt(get(r["presets"].get(p, {}), path), digits) for p in PRESETS]
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines + ["", f"setup {fmt(r['setup_s'])} s, elapsed {fmt(r['elapsed_s'])} s of "
                                  f"{r['deadline_s']:.0f}; the projections' assumptions are in gpu_check.json"]) + "\n"


def main(argv=None, clock=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="a tiny model on the CPU (CI)")
    ap.add_argument("--dry-run", action="store_true", help="a fake clock and a fake trainer: budgets and JSON only")
    ap.add_argument("--out", default=str(REPO / ".gpu_check"))
    ap.add_argument("--parts", default=",".join(PRESETS), help="parts or presets, comma-separated (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="[PRESET:]KEY=VALUE", help="a trainer setting")
    ap.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="a part's time limit")
    ap.add_argument("--deadline", type=float, help="seconds for everything (full 480, cpu 600)")
    ap.add_argument("--trainer", default=str(REPO / "train_gpt.py"), help="the script to run (default: the artifact)")
    ap.add_argument("--fail", action="append", default=[], metavar="PART:hang|crash", help="--dry-run: a failing part")
    args = ap.parse_args(argv)
    args.fail_map = dict(f.split(":") for f in args.fail)
    unknown = [s for s in args.parts.split(",") if not any(p == s or p.startswith(s + ".") for p in PARTS)]
    if unknown:
        ap.error(f"unknown parts {','.join(unknown)}: parts are {', '.join(PARTS)} (or a preset: record, seed)")
    if args.dry_run:
        return Check(args, clock or FakeClock(), FakeProc).run()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an outer time limit: the part's process goes too
    return Check(args, clock or time.monotonic).run()


if __name__ == "__main__":
    sys.exit(main())
