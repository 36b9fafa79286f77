#!/usr/bin/env python3
"""Eval modes side by side on one trained model and the same validation tokens (a development tool, not part of
the submitted artifact): sliding-window eval, then test-time training in each mode given, by default chunk TTT
(LaCT: Muon on the matrices) and phased TTT (per-document LoRA and SGD global phases).

The model trains once with train_gpt_human.train (every setting read from the environment as the trainer reads
it; --tiny starts from the test suite's tiny CPU config) and is evaluated in float (no quantization).  A mode is
`label:KEY=VALUE,KEY=VALUE`, settings on top of the environment.  Per row: val_loss, val_bpb, eval seconds,
predictions per second, and the gain over sliding per extra eval-second, (bpb_sliding - bpb) / (s - s_sliding).

    python3 tools/ttt_modes.py --tiny --threads 1 --json logs/ttt_modes.json
    python3 tools/ttt_modes.py --tiny --mode "phased-lr2e-4:TTT_MODE=phased,TTT_LORA_LR=2e-4"
"""
import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt_human as tg  # noqa: E402

TINY = {"DEVICE": "cpu", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "2",
        "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "2048", "GRAD_ACCUM_STEPS": "1",
        "ITERATIONS": "300", "WARMUP_STEPS": "0", "WARMDOWN_ITERS": "100", "MAX_WALLCLOCK_SECONDS": "0",
        "ENGRAM_BUCKETS": "256", "VE_DIM": "16", "EMA_DECAY": "0.9", "TRAIN_LOG_EVERY": "100", "COMPILE": "0",
        "EVAL_BUDGET_SECONDS": "1e9"}
MODES = ["chunk-lact:TTT_MODE=chunk", "phased:TTT_MODE=phased"]


def parse_mode(text):
    label, _, settings = text.partition(":")
    return label, dict(s.split("=", 1) for s in settings.split(",") if s)


def compare(env, modes, log_path, snapshot=None):
    """Trains once (or loads the weights of a SNAPSHOT=path file); returns one dict per row, sliding first."""
    hp = tg.Hyperparameters.from_env(env)
    rt = tg.Runtime(0, 1, torch.device(hp.device or "cpu"), log_path)
    luts = tg.build_byte_tables(tg.load_tokenizer(hp), hp.vocab_size)
    val = tg.load_val_tokens(hp)
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp).to(rt.device)
    if snapshot:
        model.load_state_dict(torch.load(snapshot, map_location=rt.device)["model"])
    else:
        tg.train(model, hp, rt)
    state = copy.deepcopy(model.state_dict())
    rows = []
    for label, settings in [("sliding", None)] + modes:
        model.load_state_dict(state)
        mode_hp = tg.Hyperparameters.from_env({**env, **(settings or {})})
        t0 = time.perf_counter()
        if settings is None:
            (loss, bpb), adapted = tg.eval_sliding(model, val, mode_hp, rt, luts), ""
        else:
            loss, bpb, done, total = tg.eval_ttt(model, val, mode_hp, rt, luts, t0)
            adapted = f"{done}/{total}"
        seconds = time.perf_counter() - t0
        rows.append({"mode": label, "settings": settings or {}, "val_loss": loss, "val_bpb": bpb, "seconds": seconds,
                     "predictions_per_s": (len(val) - 1) / seconds, "adapted": adapted})
    for row in rows[1:]:
        extra = row["seconds"] - rows[0]["seconds"]
        row["gain_per_extra_s"] = (rows[0]["val_bpb"] - row["val_bpb"]) / extra if extra > 0 else None
    return rows


def markdown(header, lines):
    """A markdown table: the header's cells, then one list of cells per row."""
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in [header, ["---"] * len(header), *lines])


def table(rows):
    def cells(row):
        per_s = row.get("gain_per_extra_s")
        return [row["mode"], f"{row['val_bpb']:.4f}", f"{rows[0]['val_bpb'] - row['val_bpb']:+.4f}",
                f"{row['seconds']:.1f}", f"{row['predictions_per_s']:.0f}", "-" if per_s is None else f"{per_s:.5f}",
                row["adapted"] or "-"]

    return markdown(["mode", "val_bpb", "gain vs sliding", "eval s", "predictions/s", "gain per extra eval-s",
                     "adapted"], [cells(row) for row in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", action="append",
                    help="label:KEY=VALUE,... (repeatable; default: the two TTT modes)")
    ap.add_argument("--tiny", action="store_true", help="start from the tiny CPU config (env vars override it)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--snapshot", help="evaluate the weights of this SNAPSHOT file instead of training "
                                       "(same model settings)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {**(TINY if args.tiny else {}), **{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}}
    os.makedirs("logs", exist_ok=True)
    modes = [parse_mode(m) for m in args.mode or MODES]
    rows = compare(env, modes, os.path.join("logs", "ttt_modes.txt"), args.snapshot)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
