#!/usr/bin/env python3
"""Summarize Parameter Golf run logs.

Reads one or more run logs (format described in the repo spec: ``seed:``,
``step:`` lines, ``final_*_exact`` lines, ``Total submission size``), prints a
per-seed table, mean and sample standard deviation of every metric, and the
challenge significance test (improvement of at least ``--delta`` nats of
val_loss over a baseline at ``p < --alpha``, one-sided Welch t-test).

Optionally writes a submission.json (``--json``) and a PNG of the training /
validation curves (``--plot``).

Importable API::

    parse_log(path) -> dict
    summarize(runs, baseline_loss=None, baseline_losses=None, ...) -> dict
    welch_one_sided(a, b, delta) -> (t, df, p)
    t_sf(t, df) -> float
    betainc_reg(a, b, x) -> float

No scipy: the Student-t tail probability comes from the regularized
incomplete beta function, evaluated with a continued fraction.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
from typing import Iterable, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------
# Student-t distribution
# ---------------------------------------------------------------------------

_TINY = 1e-300


def _beta_cf(a: float, b: float, x: float, max_iter: int = 10000, eps: float = 1e-15) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    qab = a + b
    qap = a + 1.0
    qam = a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    if abs(d) < _TINY:
        d = _TINY
    d = 1.0 / d
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        # even step
        num = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + num * d
        if abs(d) < _TINY:
            d = _TINY
        c = 1.0 + num / c
        if abs(c) < _TINY:
            c = _TINY
        d = 1.0 / d
        h *= d * c
        # odd step
        num = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + num * d
        if abs(d) < _TINY:
            d = _TINY
        c = 1.0 + num / c
        if abs(c) < _TINY:
            c = _TINY
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b) with y = 1 - x passed in separately (keeps precision when x ~ 1)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(y))
    front = math.exp(log_front)
    # The continued fraction converges fast for x < (a+1)/(a+b+2); otherwise
    # use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, y) / b


def betainc_reg(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError("betainc_reg needs a > 0 and b > 0")
    if not 0.0 <= x <= 1.0:
        raise ValueError("betainc_reg needs 0 <= x <= 1")
    return _betainc(a, b, x, 1.0 - x)


def t_sf(t: float, df: float) -> float:
    """Survival function P(T > t) of Student's t with ``df`` (> 0, may be fractional)."""
    if not df > 0:
        raise ValueError("t_sf needs df > 0")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if t == 0.0:
        return 0.5
    # P(|T| > |t|) = I_x(df/2, 1/2) with x = df / (df + t^2)
    t2 = t * t
    x = df / (df + t2)
    y = t2 / (df + t2)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x, y)  # P(T > |t|)
    return tail if t > 0 else 1.0 - tail


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _sample_var(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def welch_one_sided(a: Sequence[float], b: Sequence[float], delta: float = 0.0):
    """One-sided Welch t-test of H1: mean(a) < mean(b) - delta.

    ``a`` are the candidate's losses, ``b`` the baseline's.  A ``b`` with a
    single value (or zero spread) is treated as a constant, which reduces the
    test to a one-sample t-test with ``len(a) - 1`` degrees of freedom.

    Returns ``(t, df, p)``; p is the probability under H0 of a t at least this
    large.  Returns NaNs when the test is undefined (fewer than 2 values in
    ``a`` with a constant baseline, or zero variance on both sides with an
    observed difference of exactly zero).
    """
    a = [float(v) for v in a]
    b = [float(v) for v in b]
    if not a or not b:
        raise ValueError("welch_one_sided needs at least one value on each side")
    na, nb = len(a), len(b)
    va = _sample_var(a) / na if na > 1 else math.nan
    vb = _sample_var(b) / nb if nb > 1 else 0.0
    if math.isnan(va):
        return math.nan, math.nan, math.nan
    diff = (_mean(b) - delta) - _mean(a)
    se2 = va + vb
    if se2 == 0.0:
        if diff > 0:
            return math.inf, math.nan, 0.0
        if diff < 0:
            return -math.inf, math.nan, 1.0
        return math.nan, math.nan, math.nan
    t = diff / math.sqrt(se2)
    den = va * va / (na - 1) + (vb * vb / (nb - 1) if nb > 1 else 0.0)
    df = se2 * se2 / den
    return t, df, t_sf(t, df)


# ---------------------------------------------------------------------------
# Log parsing
# ---------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf"
_RE_SEED = re.compile(r"^seed:(\d+)\s*$")
_RE_WORLD = re.compile(r"^world_size:(\d+)\s+grad_accum_steps:(\d+)(?:\s+device:(\S+))?")
_RE_PARAMS = re.compile(r"^model_params:(\d+)")
_RE_STEP = re.compile(r"^step:(\d+)/(\d+)\s+(.*)$")
_RE_KV = re.compile(r"(\w+):(" + _NUM + r")(ms)?(?=\s|$)")
_RE_STOP = re.compile(r"^stopping_early:\s*(\S+)\s+train_time:(\d+(?:\.\d+)?)ms\s+step:(\d+)/(\d+)")
_RE_DONE = re.compile(r"^training_done\s+steps:(\d+)\s+train_time:(\d+(?:\.\d+)?)ms")
_RE_EVAL_PHASE = re.compile(r"^eval_phase_time:(\d+(?:\.\d+)?)s")
_RE_PEAK = re.compile(r"^peak memory allocated:\s*(\d+)\s*MiB\s+reserved:\s*(\d+)\s*MiB")
_RE_FINAL = re.compile(r"^final_(\w+?)_exact\s+val_loss:(" + _NUM + r")\s+val_bpb:(" + _NUM + r")(.*)$")
_RE_SERIAL = re.compile(r"^Serialized model(?:\s+(\S+))?:\s*(\d+)\s*bytes")
_RE_CODE = re.compile(r"^Code size:\s*(\d+)\s*bytes")
_RE_TOTAL = re.compile(r"^Total submission size(?:\s+(\S+))?:\s*(\d+)\s*bytes")
_RE_CODE_SHA = re.compile(r"^code_sha256:([0-9a-f]+)(?:\s+python:(\S+))?(?:\s+torch:(\S+))?")
_RE_CONFIG = re.compile(r"^config:\s?(.*)$")
_RE_CONFIG_KEY = re.compile(r"^[a-z_][a-z0-9_]*=")
_RE_VAL_TOKENS = re.compile(r"^val_tokens:(\d+)(?:\s+val_docs:(\d+))?")
_RE_HESSIANS = re.compile(r"^gptq:hessians\b.*\btrain\+hessians:(\d+(?:\.\d+)?)ms")
# lines that set one run field: (pattern, field, regex group, type)
_SINGLE_VALUES = [(_RE_EVAL_PHASE, "eval_phase_s", 1, float), (_RE_PEAK, "peak_mem_mib", 1, int),
                  (_RE_SERIAL, "bytes_model", 2, int), (_RE_CODE, "bytes_code", 1, int),
                  (_RE_TOTAL, "bytes_total", 2, int), (_RE_VAL_TOKENS, "val_tokens", 1, int),
                  (_RE_HESSIANS, "train_hessians_ms", 1, float)]

# Order of preference for the challenge score (best first).
SCORE_KINDS = ("ttt", "sliding", "roundtrip")
# the final lines inside the timed eval phase (roundtrip is a diagnostic before its clock starts)
TIMED_EVALS = ("sliding", "ttt")


def _classify_final(tag: str):
    """Map the middle of ``final_<tag>_exact`` to (stage, quant).

    ``prequant`` -> ('prequant', None); ``sliding_window`` -> ('prequant_sliding', None);
    ``int6_roundtrip`` -> ('roundtrip', 'int6'); ``int6_sliding_window`` ->
    ('sliding', 'int6'); ``int6_ttt`` -> ('ttt', 'int6').  Unknown tags -> (tag, None).
    """
    if tag == "prequant":
        return "prequant", None
    if tag == "sliding_window":
        return "prequant_sliding", None
    if tag == "ttt":
        return "prequant_ttt", None
    for suffix, stage in (("_roundtrip", "roundtrip"), ("_sliding_window", "sliding"), ("_ttt", "ttt")):
        if tag.endswith(suffix):
            return stage, tag[: -len(suffix)]
    return tag, None


def _num(s: str) -> float:
    return float(s)


def parse_log(path) -> dict:
    """Parse one run log into a dict.

    Keys: path, run_id, seed, world_size, grad_accum_steps, device, model_params,
    steps, iterations, step_avg_ms, train_time_ms, train_s, stopped_early,
    peak_mem_mib, train_curve [(step, train_loss)], val_curve [(step, val_loss, val_bpb)],
    finals {stage: {val_loss, val_bpb, eval_time_ms?, chunks_adapted?, quant?}},
    quant, bytes_model, bytes_code, bytes_total, eval_phase_s, eval_s (eval_phase_time
    if logged, else the sum of the timed sliding and TTT lines' eval_time), and the score fields
    score_kind / val_loss / val_bpb (best of ttt > sliding > roundtrip, None if absent);
    code_sha256 / python / torch (the ``code_sha256:`` line), config (the ``config:`` line as
    {field: value string}, None without one), val_tokens, train_hessians_ms (the
    ``gptq:hessians`` line's train+hessians), expected_stage (the final line the config asks
    for, None without a config) and problem (why the log is not a finished run, else None).
    Lines that do not match the format (e.g. a code dump) are ignored.
    """
    path = os.fspath(path)
    run = {
        "path": path,
        "run_id": os.path.splitext(os.path.basename(path))[0],
        "seed": None,
        "world_size": None,
        "grad_accum_steps": None,
        "device": None,
        "model_params": None,
        "steps": None,
        "iterations": None,
        "step_avg_ms": None,
        "train_time_ms": None,
        "stopped_early": None,
        "peak_mem_mib": None,
        "train_curve": [],
        "val_curve": [],
        "finals": {},
        "quant": None,
        "bytes_model": None,
        "bytes_code": None,
        "bytes_total": None,
        "eval_phase_s": None,
        "code_sha256": None,
        "python": None,
        "torch": None,
        "config": None,
        "val_tokens": None,
        "train_hessians_ms": None,
    }
    last_step = None
    seed_lines = 0
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for raw in fh:
            line = raw.strip()
            if not line:
                continue
            m = _RE_SEED.match(line)
            if m:
                run["seed"] = int(m.group(1))
                seed_lines += 1
                continue
            m = _RE_CODE_SHA.match(line)
            if m:
                run["code_sha256"], run["python"], run["torch"] = m.groups()
                continue
            m = _RE_CONFIG.match(line)
            if m:
                run["config"] = parse_config(m.group(1))
                continue
            m = _RE_WORLD.match(line)
            if m:
                run["world_size"] = int(m.group(1))
                run["grad_accum_steps"] = int(m.group(2))
                run["device"] = m.group(3)
                continue
            m = _RE_PARAMS.match(line)
            if m:
                run["model_params"] = int(m.group(1))
                continue
            m = _RE_STEP.match(line)
            if m:
                step, total = int(m.group(1)), int(m.group(2))
                kv = {k: _num(v) for k, v, _ms in _RE_KV.findall(m.group(3))}
                if "val_loss" not in kv and "train_loss" not in kv:
                    continue
                run["iterations"] = total
                if "train_loss" in kv:
                    run["train_curve"].append((step, kv["train_loss"]))
                if "val_loss" in kv and "val_bpb" in kv:
                    run["val_curve"].append((step, kv["val_loss"], kv["val_bpb"]))
                if last_step is None or step >= last_step:
                    last_step = step
                    if "train_time" in kv:
                        run["train_time_ms"] = kv["train_time"]
                    if "step_avg" in kv:
                        run["step_avg_ms"] = kv["step_avg"]
                continue
            m = _RE_STOP.match(line)
            if m:
                run["stopped_early"] = m.group(1)
                run["train_time_ms"] = float(m.group(2))
                run["steps"] = int(m.group(3))
                run["iterations"] = int(m.group(4))
                continue
            m = _RE_DONE.match(line)
            if m:
                run["steps"] = int(m.group(1))
                run["train_time_ms"] = float(m.group(2))
                continue
            single = next(((key, group, cast, m) for regex, key, group, cast in _SINGLE_VALUES
                           if (m := regex.match(line))), None)
            if single:
                key, group, cast, m = single
                run[key] = cast(m.group(group))
                continue
            m = _RE_FINAL.match(line)
            if m:
                stage, quant = _classify_final(m.group(1))
                entry = {"val_loss": _num(m.group(2)), "val_bpb": _num(m.group(3))}
                for k, v, ms in _RE_KV.findall(m.group(4)):
                    entry[k + ("_ms" if ms else "")] = _num(v)
                cm = re.search(r"chunks_adapted:(\d+)/(\d+)", m.group(4))
                if cm:
                    entry["chunks_adapted"] = int(cm.group(1))
                    entry["chunks_total"] = int(cm.group(2))
                if quant:
                    entry["quant"] = quant
                    run["quant"] = quant
                run["finals"][stage] = entry
                continue
    if run["steps"] is None:
        run["steps"] = last_step
    run["train_s"] = None if run["train_time_ms"] is None else run["train_time_ms"] / 1000.0
    eval_ms = [f["eval_time_ms"] for k, f in run["finals"].items()
               if k in TIMED_EVALS and "eval_time_ms" in f]
    # whole eval phase when the log reports it, else the sum of the timed final lines' eval_time
    if run["eval_phase_s"] is not None:
        run["eval_s"] = run["eval_phase_s"]
    else:
        run["eval_s"] = sum(eval_ms) / 1000.0 if eval_ms else None
    kind = next((k for k in SCORE_KINDS if k in run["finals"]), None)
    run["score_kind"] = kind
    run["val_loss"] = run["finals"][kind]["val_loss"] if kind else None
    run["val_bpb"] = run["finals"][kind]["val_bpb"] if kind else None
    run["expected_stage"] = expected_stage(run["config"])
    run["problem"] = _problem(run, seed_lines)
    return run


def parse_config(text: str) -> dict:
    """``key=value ...`` of a ``config:`` line; a word without ``key=`` continues the value before it."""
    config, key = {}, None
    for word in text.split():
        if _RE_CONFIG_KEY.match(word):
            key, value = word.split("=", 1)
            config[key] = value
        elif key is not None:
            config[key] += " " + word
    return config


def expected_stage(config):
    """The score stage a run with this config ends with (TTT on: ttt; off: sliding, or the roundtrip in logs of
    versions that could switch the sliding eval off)."""
    if not config or "ttt_enabled" not in config:
        return None
    if config["ttt_enabled"] != "0":
        return "ttt"
    return "roundtrip" if config.get("eval_int6_sliding") == "0" else "sliding"


def final_line_name(stage, quant=None) -> str:
    """The log line a score stage comes from, e.g. ``final_int6_ttt_exact``."""
    suffix = {"ttt": "ttt", "sliding": "sliding_window", "roundtrip": "roundtrip"}[stage]
    return f"final_{quant or 'int6'}_{suffix}_exact"


def _problem(run, seed_lines):
    if seed_lines > 1:
        return f"the log holds {seed_lines} runs (its run id was reused); rerun the seed with a new RUN_ID"
    if run["score_kind"] is None:
        return "no final_*_exact score line: the run stopped before its quantized eval"
    stage = run["expected_stage"]
    if stage and stage not in run["finals"]:
        return f"no {final_line_name(stage, run['quant'])} line: the run stopped before its final eval"
    return None


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------

# (column name, function run -> value)
COLUMNS = (
    ("seed", lambda r: r["seed"]),
    ("steps", lambda r: r["steps"]),
    ("step_avg_ms", lambda r: r["step_avg_ms"]),
    ("prequant_bpb", lambda r: r["finals"].get("prequant", {}).get("val_bpb")),
    ("prequant_loss", lambda r: r["finals"].get("prequant", {}).get("val_loss")),
    ("roundtrip_bpb", lambda r: r["finals"].get("roundtrip", {}).get("val_bpb")),
    ("roundtrip_loss", lambda r: r["finals"].get("roundtrip", {}).get("val_loss")),
    ("sliding_bpb", lambda r: r["finals"].get("sliding", {}).get("val_bpb")),
    ("sliding_loss", lambda r: r["finals"].get("sliding", {}).get("val_loss")),
    ("ttt_bpb", lambda r: r["finals"].get("ttt", {}).get("val_bpb")),
    ("ttt_loss", lambda r: r["finals"].get("ttt", {}).get("val_loss")),
    ("bytes_total", lambda r: r["bytes_total"]),
    ("train_s", lambda r: r["train_s"]),
    ("eval_s", lambda r: r["eval_s"]),
)

BYTES_LIMIT = 16_000_000


def _stats(values: Iterable):
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"n": 0, "mean": None, "std": None}
    return {
        "n": len(vals),
        "mean": _mean(vals),
        "std": math.sqrt(_sample_var(vals)) if len(vals) > 1 else None,
    }


def run_status(run, failed_seeds=()):
    """(status, reason): ``ok``; ``failed`` (the seed is in ``failed_seeds``: its runner reported a
    failure); ``incomplete`` (the log is not a finished run, see parse_log's ``problem``)."""
    if run["seed"] is not None and run["seed"] in failed_seeds:
        return "failed", run["problem"] or "the deploy script reported this seed as failed"
    if run["problem"]:
        return "incomplete", run["problem"]
    return "ok", None


def summarize(runs, baseline_loss=None, baseline_losses=None, delta: float = 0.005,
              alpha: float = 0.01, score_kind=None, failed_seeds=()) -> dict:
    """Summarize parsed runs.

    A run that did not finish (parse_log's ``problem``, or its seed in ``failed_seeds``) keeps
    its row, marked in ``status``, and is left out of the stats and the test; ``excluded``
    names each, and ``missing_seeds`` the failed seeds that have no log at all.
    The score stage is the best of ttt > sliding > roundtrip that is present in
    *every* finished run (so seeds are compared like for like), unless ``score_kind`` is
    given.  The significance test compares the runs' val_loss at that stage with
    ``baseline_losses`` (Welch, two-sample) or the constant ``baseline_loss``.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("summarize needs at least one run")
    failed_seeds = [int(v) for v in failed_seeds]
    statuses = [run_status(r, failed_seeds) for r in runs]
    done = [r for r, (status, _) in zip(runs, statuses) if status == "ok"]
    warnings = []
    if score_kind is None:
        score_kind = next((k for k in SCORE_KINDS if done and all(k in r["finals"] for r in done)), None)
        kinds = {r["score_kind"] for r in done}
        if len(kinds) > 1:
            warnings.append(f"runs have different best final lines {sorted(map(str, kinds))}; "
                            f"using the best common one: {score_kind}")
    if score_kind is None:
        warnings.append("no finished run has a common final roundtrip/sliding/ttt line; no score")
    rows = []
    for r, (status, reason) in zip(runs, statuses):
        row = {name: fn(r) for name, fn in COLUMNS}
        row["path"] = r["path"]
        row["status"], row["problem"] = status, reason
        f = r["finals"].get(score_kind, {}) if score_kind and status == "ok" else {}
        row["score_val_loss"] = f.get("val_loss")
        row["score_val_bpb"] = f.get("val_bpb")
        rows.append(row)
    ok_rows = [row for row in rows if row["status"] == "ok"]
    stats = {name: _stats(row[name] for row in ok_rows) for name, _ in COLUMNS if name != "seed"}
    stats["score_val_loss"] = _stats(row["score_val_loss"] for row in ok_rows)
    stats["score_val_bpb"] = _stats(row["score_val_bpb"] for row in ok_rows)
    excluded = [{"seed": row["seed"], "log": os.path.basename(row["path"]), "status": row["status"],
                 "reason": row["problem"]} for row in rows if row["status"] != "ok"]
    logged = {r["seed"] for r in runs}
    missing = [seed for seed in dict.fromkeys(failed_seeds) if seed not in logged]
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        warnings.append(f"duplicate seeds: {seeds}")
    byte_vals = [r["bytes_total"] for r in done if r["bytes_total"] is not None]
    bytes_max = max(byte_vals) if byte_vals else None
    if bytes_max is not None and bytes_max > BYTES_LIMIT:
        warnings.append(f"bytes_total {bytes_max} exceeds the {BYTES_LIMIT} byte limit")
    if len(byte_vals) < len(done):
        warnings.append("some runs have no 'Total submission size' line")

    sig = None
    losses = [row["score_val_loss"] for row in rows if row["score_val_loss"] is not None]
    base = None
    if baseline_losses is not None:
        base = [float(v) for v in baseline_losses]
        mode = "welch_two_sample" if len(base) > 1 else "one_sample_constant_baseline"
    elif baseline_loss is not None:
        base = [float(baseline_loss)]
        mode = "one_sample_constant_baseline"
    if base is not None:
        if losses:
            t, df, p = welch_one_sided(losses, base, delta)
        else:
            t = df = p = math.nan
        sig = {
            "mode": mode,
            "baseline_mean": _mean(base),
            "baseline_n": len(base),
            "delta": delta,
            "alpha": alpha,
            "n": len(losses),
            "mean": _mean(losses) if losses else None,
            "improvement": (_mean(base) - _mean(losses)) if losses else None,
            "t": t,
            "df": df,
            "p": p,
            "significant": bool(p == p and p < alpha),
        }
        if len(losses) < 2:
            warnings.append("significance test needs at least 2 runs")
    return {
        "n_runs": len(runs),
        "n_finished": len(done),
        "score_kind": score_kind,
        "quant": next((r["quant"] for r in runs if r["quant"]), None),
        "rows": rows,
        "stats": stats,
        "excluded": excluded,
        "missing_seeds": missing,
        "bytes_total_max": bytes_max,
        "bytes_code_max": max((r["bytes_code"] for r in done if r["bytes_code"] is not None), default=None),
        "significance": sig,
        "warnings": warnings,
    }


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def _fmt(v, name=""):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if name in ("seed", "steps", "bytes_total"):
        return str(int(v)) if float(v).is_integer() else f"{v:.1f}"
    if name.endswith(("_bpb", "_loss")):
        return f"{v:.5f}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def format_table(summary: dict) -> str:
    names = [n for n, _ in COLUMNS]
    header = names + ["status"]
    body = [[_fmt(row[n], n) for n in names] + [row["status"]] for row in summary["rows"]]
    mean_row = ["mean"] + [_fmt(summary["stats"][n]["mean"], n) for n in names[1:]] + [""]
    std_row = ["std"] + [_fmt(summary["stats"][n]["std"], "x_loss" if n.endswith(("_bpb", "_loss")) else "")
                         for n in names[1:]] + [""]
    all_rows = [header] + body + [mean_row, std_row]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in body]
    out += [line(mean_row), line(std_row)]
    return "\n".join(out)


def format_report(summary: dict) -> str:
    lines = [format_table(summary), ""]
    k = summary["score_kind"]
    sl, sb = summary["stats"]["score_val_loss"], summary["stats"]["score_val_bpb"]
    if k:
        lines.append(f"score ({k}): val_bpb mean {_fmt(sb['mean'], '_bpb')} std {_fmt(sb['std'], '_bpb')} | "
                     f"val_loss mean {_fmt(sl['mean'], '_loss')} std {_fmt(sl['std'], '_loss')} "
                     f"(n={sl['n']}, sample std)")
    lines.append(f"bytes_total max: {_fmt(summary['bytes_total_max'], 'bytes_total')} (limit {BYTES_LIMIT})")
    if summary["significance"]:
        lines.append("significance " + format_significance(summary["significance"]))
    lines += format_excluded(summary)
    for w in summary["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def format_significance(sig: dict) -> str:
    return (f"[{sig['mode']}]: baseline val_loss {sig['baseline_mean']:.5f} (n={sig['baseline_n']}), "
            f"need improvement >= {sig['delta']} nats at p < {sig['alpha']}: "
            f"improvement {_fmt(sig['improvement'], '_loss')}, t={sig['t']:.4f}, df={sig['df']:.3f}, "
            f"p={sig['p']:.6g} -> {'SIGNIFICANT' if sig['significant'] else 'not significant'}")


def format_excluded(summary: dict) -> list:
    """One line per seed that did not finish: its log and why, and that it is left out."""
    lines = [f"{e['status'].upper()}: seed {e['seed']} ({e['log']}): {e['reason']}; "
             f"left out of the mean, std and significance test" for e in summary["excluded"]]
    lines += [f"FAILED: seed {seed}: no log came back; rerun it" for seed in summary["missing_seeds"]]
    if lines:
        total = summary["n_runs"] + len(summary["missing_seeds"])
        lines.append(f"finished: {summary['n_finished']} of {total} seeds; "
                     "the mean, std and test above are over the finished ones only")
    return lines


def build_submission(summary: dict, name: str, author: str, github_id: str, blurb: str,
                     date: str | None = None) -> dict:
    sl, sb = summary["stats"]["score_val_loss"], summary["stats"]["score_val_bpb"]
    sig = summary["significance"]
    sub = {
        "name": name,
        "author": author,
        "github_id": github_id,
        "date": date or _dt.date.today().isoformat(),
        "val_bpb": sb["mean"],
        "val_loss": sl["mean"],
        "val_bpb_std": sb["std"],
        "val_loss_std": sl["std"],
        "bytes_total": summary["bytes_total_max"],
        "bytes_code": summary["bytes_code_max"],
        "score_stage": summary["score_kind"],
        "quant": summary["quant"],
        "seeds": [row["seed"] for row in summary["rows"] if row["status"] == "ok"],
        "per_seed": [
            {
                "seed": row["seed"],
                "val_bpb": row["score_val_bpb"],
                "val_loss": row["score_val_loss"],
                "bytes_total": row["bytes_total"],
                "steps": row["steps"],
                "train_s": row["train_s"],
                "eval_s": row["eval_s"],
                "log": os.path.basename(row["path"]),
            }
            for row in summary["rows"] if row["status"] == "ok"
        ],
        "blurb": blurb,
    }
    if summary["excluded"] or summary["missing_seeds"]:
        sub["not_finished"] = summary["excluded"] + [
            {"seed": seed, "log": None, "status": "failed", "reason": "no log came back"}
            for seed in summary["missing_seeds"]]
    if sig:
        sub["significance"] = {k: (None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v)
                               for k, v in sig.items()}
    return sub


def plot_runs(runs, out_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        label = f"seed {r['seed']}" if r["seed"] is not None else r["run_id"]
        if r["train_curve"]:
            xs, ys = zip(*r["train_curve"])
            ax1.plot(xs, ys, label=label, linewidth=1)
        if r["val_curve"]:
            xs = [v[0] for v in r["val_curve"]]
            ys = [v[2] for v in r["val_curve"]]
            (ln,) = ax2.plot(xs, ys, marker="o", markersize=3, label=label, linewidth=1)
            color = ln.get_color()
        else:
            color = None
        if r["val_bpb"] is not None and r["steps"] is not None:
            ax2.scatter([r["steps"]], [r["val_bpb"]], marker="*", s=80, color=color,
                        label=f"{label} final {r['score_kind']}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss (nats/token)")
    ax1.set_title("train loss")
    ax2.set_xlabel("step")
    ax2.set_ylabel("val bpb")
    ax2.set_title("validation bits per byte")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, format="png", dpi=100)
    plt.close(fig)


def _jsonable(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="run log files (logs/<RUN_ID>.txt)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--baseline-loss", type=float, help="baseline val_loss, treated as a constant")
    g.add_argument("--baseline-logs", nargs="+", help="baseline run logs (Welch two-sample test)")
    ap.add_argument("--delta", type=float, default=0.005, help="required improvement in nats (default 0.005)")
    ap.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    ap.add_argument("--score", choices=SCORE_KINDS, help="force the score stage (default: best common)")
    ap.add_argument("--json", metavar="OUT", help="write a submission.json here")
    ap.add_argument("--summary-json", metavar="OUT", help="write the full summary dict as JSON here")
    ap.add_argument("--name", default="TODO submission name")
    ap.add_argument("--author", default="TODO author")
    ap.add_argument("--github-id", default="TODO github id")
    ap.add_argument("--blurb", default="TODO one-paragraph description")
    ap.add_argument("--date", default=None, help="ISO date for submission.json (default today)")
    ap.add_argument("--plot", metavar="OUT.png", help="plot train loss / val bpb curves per seed")
    ap.add_argument("--failed-seeds", nargs="+", type=int, default=[], metavar="SEED",
                    help="seeds whose runner reported a failure: marked FAILED, left out of the statistics")
    rec = ap.add_argument_group("records folder (see tools/record_folder.py)")
    rec.add_argument("--records-dir", metavar="DIR",
                     help="check the logs against the PR checklist and, if they pass, write DIR: "
                          "README.md, submission.json, train_gpt.py, the logs")
    rec.add_argument("--allow", action="append", metavar="CHECK[,CHECK]",
                     help="write the folder although these checks fail (its README says so)")
    rec.add_argument("--val-tokens", type=int, metavar="N", help="the full validation set's token count")
    rec.add_argument("--hardware", help="the machine, when the logs ran on CUDA (default: 8xH100 80GB SXM)")
    rec.add_argument("--code", metavar="FILE", help="the train_gpt.py that ran (default: the repo's)")
    args = ap.parse_args(argv)

    for p in args.logs + (args.baseline_logs or []):
        if not os.path.isfile(p):
            ap.error(f"no such log file: {p}")
    if args.records_dir:
        import record_folder as rf  # beside this file
        code_path = args.code or os.path.join(os.path.dirname(_HERE), "train_gpt.py")
        try:
            allow = rf.parse_allow(args.allow)
            rf.check_paths(args.records_dir, code_path)
        except rf.RecordError as e:
            ap.error(str(e))
    else:
        given = [f for f in ("allow", "val_tokens", "hardware", "code") if getattr(args, f) is not None]
        if given:
            ap.error(f"--{given[0].replace('_', '-')} works only with --records-dir DIR")
    runs = [parse_log(p) for p in args.logs]
    baseline_losses = None
    if args.baseline_logs:
        bruns = [parse_log(p) for p in args.baseline_logs]
        kind = args.score or next((k for k in SCORE_KINDS if all(k in r["finals"] for r in bruns)), None)
        if kind is None:
            ap.error("baseline logs have no common final roundtrip/sliding/ttt line")
        baseline_losses = [r["finals"][kind]["val_loss"] for r in bruns]
    summary = summarize(runs, baseline_loss=args.baseline_loss, baseline_losses=baseline_losses,
                        delta=args.delta, alpha=args.alpha, score_kind=args.score,
                        failed_seeds=args.failed_seeds)
    print(format_report(summary))
    sub = build_submission(summary, args.name, args.author, args.github_id, args.blurb, args.date)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(_jsonable(sub), fh, indent=2)
            fh.write("\n")
        print(f"wrote {args.json}")
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as fh:
            json.dump(_jsonable(summary), fh, indent=2)
            fh.write("\n")
    if args.plot:
        plot_runs(runs, args.plot)
        print(f"wrote {args.plot}")
    if args.records_dir:
        try:
            return rf.make_record(runs, summary, sub, args.records_dir, allow=allow, code_path=code_path,
                                  val_tokens=args.val_tokens, hardware=args.hardware or rf.DEFAULT_HARDWARE,
                                  name=args.name, blurb=args.blurb, date=sub["date"])
        except rf.RecordError as e:
            ap.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
