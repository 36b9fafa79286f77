#!/usr/bin/env python3
"""Quantization report: one trained model (the file a run with SNAPSHOT=path writes: weights + Hessians),
every quantization variant at the same byte budget, scored on the validation split.

    <the run's settings> python3 tools/quant_report.py SNAPSHOT [--budget-per-param 0.52] [--json out.json]

The model settings come from the environment, exactly as for the run that wrote the snapshot.  The budget defaults
to the full-size ratio: 16,000,000 bytes for the seed's 30.66 M parameters (0.52 bytes per parameter); a small
model's int8 tables are a larger share of it, so to match the full-size seed choose the ratio that leaves its bank
matrices what the seed's get, 0.49 bytes per matrix parameter (README, Results, issue #22).  For each
variant: bytes, quantized val_bpb and the tax over the unquantized model, and the time quantize_model took.  Then
the packing layouts: the same codes serialized layer by layer (today), grouped by matrix type, and grouped and
transposed, each compressed with the artifact's compressor.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt_human as tg  # noqa: E402

VARIANTS = {  # name -> quantization settings over PLAIN (the others are the run's own)
    "sdclip int5": {"matrix_bits": 5},
    "sdclip int6": {},
    "sdclip int7": {"matrix_bits": 7},
    "sdclip + lqer": {"lqer_rank": 4},
    "sdclip int5 + embed int8": {"matrix_bits": 5, "embed_bits": 8},
    "sdclip + embed int7": {"embed_bits": 7},
    "sdclip + embed int8": {"embed_bits": 8},
    "sdclip + embed int7 + lqer (record)": {"embed_bits": 7, "lqer_rank": 4},
    "sdclip + embed int7 + awq-lite": {"embed_bits": 7, "awq_groups": 1},
    "sdclip + embed int7 + lqer + awq-lite": {"embed_bits": 7, "lqer_rank": 4, "awq_groups": 1},
}
LOGGED = ("quant:awq", "quant:sdclip", "quant:warning")  # packer lines kept per variant
PLAIN = {"matrix_bits": 6, "embed_bits": 0, "lqer_rank": 0, "awq_groups": 0}  # not the preset's
LAYOUT_VARIANT = "sdclip int6"  # whose codes the packing layouts are measured on


def layouts(entries):
    """Artifact sizes of the same entries in three layouts: layer by layer (today), grouped by matrix type, and
    grouped with every code matrix transposed (sizes only: the transposed blob is not a loadable artifact)."""
    banked = [e for e in entries if "#" in e[0]]
    rest = [e for e in entries if "#" not in e[0]]
    by_type = sorted(banked, key=lambda e: (e[0].split("#")[0], int(e[0].split("#")[1])))
    transposed = [e._replace(codes=e.codes.T.contiguous()) for e in by_type]

    def size(order):
        return len(tg.compress_bytes(tg.serialize(rest + order)))

    return {"layer by layer (today)": size(banked), "grouped by type": size(by_type),
            "grouped + transposed": size(transposed)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("snapshot")
    ap.add_argument("--budget-per-param", type=float, default=16_000_000 / 30_656_624)
    ap.add_argument("--val-tokens", type=int, default=131073)
    ap.add_argument("--variants", help="comma-separated names from VARIANTS (default: all)")
    ap.add_argument("--json")
    args = ap.parse_args()
    hp = tg.Hyperparameters.from_env()
    rt = tg.Runtime(0, 1, torch.device("cpu"), os.devnull)
    snap = torch.load(args.snapshot, map_location="cpu")
    model = tg.GPT(hp)
    model.load_state_dict(snap["model"])
    n_params = sum(p.numel() for p in model.parameters())
    target = int(args.budget_per_param * n_params)
    luts = tg.build_byte_tables(tg.load_tokenizer(hp), hp.vocab_size)
    val = tg.load_val_tokens(hp)[:args.val_tokens]
    _, base_bpb = tg.eval_full(model, val, hp, rt, luts)
    print(f"model {n_params} params, budget {target} bytes, unquantized val_bpb {base_bpb:.5f} "
          f"({len(val) - 1} val predictions)")
    rows, captured, gptq_all, entries = [], {}, tg.gptq_all, None

    def capture(*args):  # keeps the entries of the last sizing (the shipped artifact's) for the layouts
        captured["entries"] = gptq_all(*args)
        return captured["entries"]

    tg.gptq_all = capture
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    for name, overrides in ((n, VARIANTS[n]) for n in chosen):
        vhp = dataclasses.replace(hp, target_bytes=target, **{**PLAIN, **overrides})
        log = f"/tmp/quant_report_{os.getpid()}.log"
        vrt = tg.Runtime(0, 1, torch.device("cpu"), log)
        t0 = time.perf_counter()
        try:
            blob = tg.quantize_model(model, snap["hessians"], vhp, vrt, 0)
        except tg.ConfigError as e:  # e.g. does not fit even at the coarsest SDClip codes (nothing logged yet)
            if os.path.exists(log):
                os.remove(log)
            rows.append({"variant": name, "error": str(e)})
            print(f"{name:36s} {e}")
            continue
        seconds = time.perf_counter() - t0
        _, bpb = tg.eval_full(tg.load_artifact(blob, vhp, torch.device("cpu")), val, vhp, rt, luts)
        lines = [ln for ln in open(log).read().splitlines() if ln.startswith(LOGGED)]
        os.remove(log)
        rows.append({"variant": name, "bytes": len(blob), "val_bpb": bpb, "tax": bpb - base_bpb,
                     "quantize_s": seconds, "log": lines})
        if name == LAYOUT_VARIANT:
            entries = captured["entries"]
        print(f"{name:36s} {len(blob):9d} B  bpb {bpb:.5f}  tax {bpb - base_bpb:+.5f}  {seconds:6.1f}s  {lines}")
    packing = layouts(entries) if entries is not None else {}  # the layout variant's, when it fitted
    for name, size in packing.items():
        print(f"layout {name:25s} {size:9d} B")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": n_params, "budget": target, "unquantized_bpb": base_bpb, "rows": rows,
                       "layouts_of": LAYOUT_VARIANT, "layouts": packing}, f, indent=1)


if __name__ == "__main__":
    main()
