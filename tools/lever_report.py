#!/usr/bin/env python3
"""Levers side by side (a development tool, not part of the submitted artifact): each --train variant trains its
own model from the same seed on the same data; each --eval variant reuses the first --train variant's model and
Hessians and changes only quantization or eval settings.  Every row then runs the run's own pipeline: Hessians,
quantize_model at the budget, a fresh model from the artifact (as a grader builds it), the non-overlapping eval
of the quantized model, and test-time training in the row's TTT_MODE.

    <settings> python3 tools/lever_report.py --train "base:" --train "qk5.25:QK_GAIN_INIT=5.25" \
        --eval "lqer-off:LQER_RANK=0" --budget-per-param 0.445 --json logs/levers.json

A variant is `label:KEY=VALUE,KEY=VALUE`, settings on top of the environment.  Per row: the float model's
val_bpb, the quantized one's and its tax, the TTT val_bpb and its gain over the quantized model, the artifact's
bytes and the seconds of training and of TTT.
"""
import argparse
import copy
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt_human as tg  # noqa: E402
from ttt_modes import markdown  # noqa: E402


def parse_variant(text):
    """label:KEY=VALUE,KEY=VALUE; a value may hold commas (TRAIN_SEQ_SCHEDULE=1024@0.1,2048@0.7)."""
    label, _, settings = text.partition(":")
    return label, dict(s.split("=", 1) for s in re.split(r",(?=[A-Z0-9_]+=)", settings) if s)


def setup(env, log_path):
    hp = tg.Hyperparameters.from_env(env)
    rt = tg.Runtime(0, 1, torch.device(hp.device or "cpu"), log_path)
    tg.select_attention(hp, rt)
    val, tables = tg.load_eval_data(hp, rt)
    return hp, rt, val, tables


def trained(env, log_path):
    """(model, Hessians, float val_bpb, training seconds) of a fresh model trained with these settings."""
    hp, rt, val, luts = setup(env, log_path)
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    t0 = time.perf_counter()
    tg.train(model, hp, rt)
    seconds = time.perf_counter() - t0
    hessians = tg.collect_hessians(model, hp, rt)
    return model, hessians, tg.eval_full(model, val, hp, rt, luts)[1], seconds


def evaluate(model, hessians, env, budget_per_param, log_path):
    """Quantizes at the budget, rebuilds the model from the artifact and scores it without and with TTT."""
    hp, rt, val, luts = setup(env, log_path)
    n_params = sum(p.numel() for p in model.parameters())
    hp = tg.dataclasses.replace(hp, target_bytes=int(budget_per_param * n_params))
    blob = tg.quantize_model(copy.deepcopy(model), hessians, hp, rt, 0)
    quantized = tg.load_artifact(blob, hp, rt.device)
    quant_bpb = tg.eval_full(quantized, val, hp, rt, luts)[1]
    t0 = time.perf_counter()
    _, ttt_bpb, *_ = tg.eval_ttt(quantized, val, hp, rt, luts, t0)
    return {"bytes": len(blob), "quant_bpb": quant_bpb, "ttt_bpb": ttt_bpb, "ttt_s": time.perf_counter() - t0}


def report(env, train_variants, eval_variants, budget_per_param, log_path):
    rows, base = [], None
    for label, settings in train_variants:
        model, hessians, float_bpb, seconds = trained({**env, **settings}, log_path)
        base = base or (model, hessians, float_bpb, seconds)
        rows.append({"variant": label, "kind": "train", "settings": settings, "float_bpb": float_bpb,
                     "train_s": seconds, **evaluate(model, hessians, {**env, **settings}, budget_per_param, log_path)})
    for label, settings in eval_variants:
        model, hessians, float_bpb, seconds = base
        base_settings = train_variants[0][1]
        rows.append({"variant": label, "kind": "eval", "settings": {**base_settings, **settings},
                     "float_bpb": float_bpb, "train_s": seconds,
                     **evaluate(model, hessians, {**env, **base_settings, **settings}, budget_per_param, log_path)})
    return rows


def table(rows):
    return markdown(["variant", "settings", "float bpb", "quantized bpb (tax)", "TTT bpb (gain)", "bytes", "train s",
                     "TTT s"],
                    [[r["variant"], ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-",
                      f"{r['float_bpb']:.4f}", f"{r['quant_bpb']:.4f} ({r['quant_bpb'] - r['float_bpb']:+.4f})",
                      f"{r['ttt_bpb']:.4f} ({r['ttt_bpb'] - r['quant_bpb']:+.4f})", f"{r['bytes']:,}",
                      f"{r['train_s']:.0f}", f"{r['ttt_s']:.0f}"] for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="append", required=True, help="label:KEY=VALUE,... (repeatable; the first is "
                                                                    "the base of every --eval variant)")
    ap.add_argument("--eval", action="append", default=[], help="label:KEY=VALUE,... on the first model (repeatable)")
    ap.add_argument("--budget-per-param", type=float, default=0.445, help="artifact bytes per parameter (the "
                                                                          "full-size record's ratio by default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    os.makedirs("logs", exist_ok=True)
    rows = report(env, [parse_variant(v) for v in args.train], [parse_variant(v) for v in args.eval],
                  args.budget_per_param, os.path.join("logs", "lever_report.txt"))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__,
                       "budget_per_param": args.budget_per_param, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
