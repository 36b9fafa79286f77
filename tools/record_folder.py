"""The records folder of a submission, built and checked from its seed logs.

``tools/summarize_logs.py LOGS... --records-dir DIR`` calls ``make_record``: it runs the PR
checklist on the parsed logs (``CHECKS``), prints one line per item, and only when every
failing item is named by ``--allow`` writes DIR with README.md (per-seed table, mean and
std, the significance line, the settings that differ from the defaults, hardware, the
checklist), submission.json, the train_gpt.py that ran and the logs.

The defaults come from the ``Hyperparameters`` class and the ``PRESETS`` table of the
shipped script, read without running it: a compress.py artifact's payload is decoded with
a small evaluator that only knows the base64 / lzma calls of its stub.
"""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import lzma
import math
import os
import shlex
import shutil

import summarize_logs as sl

TRAIN_LIMIT_S = 600.0   # training + GPTQ Hessians
EVAL_LIMIT_S = 600.0    # the timed eval phase (sliding + TTT)
DEFAULT_HARDWARE = "8xH100 80GB SXM"
# Validation tokens of the challenge's full set, by vocabulary size.  sp1024: the published
# fineweb_val_000000.bin holds 62,021,846 tokens (manifest tokens_val; the shard is 124,044,716
# bytes = 1,024 header + 2 per token); the trainer loads it whole.  Other vocabularies: not
# recorded here, pass --val-tokens.
FULL_VAL_TOKENS = {1024: 62_021_846}
# config fields that differ between the seeds of one submission by design
PER_SEED_FIELDS = ("seed", "run_id")

CHECKS = (
    ("finished", "every seed finished (its final score line is in its log)"),
    ("code_hash", "every seed's code_sha256 is the shipped train_gpt.py's"),
    ("same_config", "the seeds share one config apart from SEED (and RUN_ID)"),
    ("train_time", f"training + GPTQ Hessians <= {TRAIN_LIMIT_S:.0f} s on every seed"),
    ("eval_time", f"the timed eval phase <= {EVAL_LIMIT_S:.0f} s on every seed"),
    ("artifact_bytes", f"artifact (code + model) <= {sl.BYTES_LIMIT:,} bytes on every seed"),
    ("val_tokens", "the full validation set on every seed (the same token count)"),
    ("seeds", "at least three distinct seeds"),
    ("significance", "the improvement over the baseline passes the test"),
)
CHECK_NAMES = tuple(name for name, _ in CHECKS)


class RecordError(ValueError):
    """Bad input for the records folder: the message names the file or flag and the fix."""


# ---------------------------------------------------------------------------
# the shipped script: hash and defaults
# ---------------------------------------------------------------------------

def code_sha256(path) -> str:
    """The first 16 hex digits of the file's sha256, as the trainer logs ``code_sha256:``."""
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def _brotli_decompress(data):
    import brotli  # only for artifacts packed with it (compress.py's default since issue #29)

    return brotli.decompress(data)


_STUB_CALLS = {("base64", "b85decode"): base64.b85decode, ("base64", "b64decode"): base64.b64decode,
               ("lzma", "decompress"): lzma.decompress, ("brotli", "decompress"): _brotli_decompress}
def _b94_decode(data, n):
    """compress.py's b94: 82 characters (bytes 32..126 but "'") carry 67 bytes, little-endian; the first n bytes."""
    out = bytearray()
    for j in range(0, len(data), 82):
        out += sum((c - 32 - (c > 39)) * 94 ** i for i, c in enumerate(data[j:j + 82])).to_bytes(67, "little")
    return bytes(out[:n])


def _is_name(node, name) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _stub_eval(node):
    """Evaluates the decode expression of a compress.py stub: literals, ``lzma.CONSTANT``,
    base64.b85decode / b64decode, lzma.decompress and ``"...".encode(codec)``; nothing else."""
    if isinstance(node, ast.Constant):
        return node.value
    # the b94 decoder: (lambda d: ...)(br'''...''')[:n]
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Lambda) and isinstance(node.slice, ast.Slice)):
        return _b94_decode(_stub_eval(node.value.args[0]), _stub_eval(node.slice.upper))
    if isinstance(node, ast.List):
        return [_stub_eval(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_stub_eval(k): _stub_eval(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Attribute) and _is_name(node.value, "lzma") and node.attr.isupper():
        return getattr(lzma, node.attr)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.keywords:
        args = [_stub_eval(a) for a in node.args]
        func = node.func
        if isinstance(func.value, ast.Name) and (func.value.id, func.attr) in _STUB_CALLS:
            return _STUB_CALLS[func.value.id, func.attr](*args)
        literal = func.value.value if isinstance(func.value, ast.Constant) else None
        if func.attr == "encode" and isinstance(literal, str):
            return literal.encode(*args)
    raise ValueError(f"unexpected expression in the stub: {ast.dump(node)[:80]}")


def script_source_tree(path) -> ast.Module:
    """The AST of the script's code: the file itself, or the payload of a compress.py artifact."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # the latin1 codec's artifact
    tree = ast.parse(text)
    if any(isinstance(n, ast.ClassDef) and n.name == "Hyperparameters" for n in tree.body):
        return tree
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and n.func.attr == "decompress" and isinstance(n.func.value, ast.Name)
                 and n.func.value.id in ("lzma", "brotli")), None)
    if call is None:
        raise ValueError("no Hyperparameters class and no lzma / brotli decompress payload")
    return ast.parse(_stub_eval(call).decode("utf-8"))


def _mapping(node) -> dict:
    if isinstance(node, ast.Dict):
        return {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and not node.args:  # dict(...), under whatever name the minifier gave it
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    raise ValueError("PRESETS entry is not a literal dict")


def _default(node):
    """A field's default: a literal, or the first argument of the trainer's setting(default, ...)."""
    return ast.literal_eval(node.args[0] if isinstance(node, ast.Call) else node)


def _module_values(tree):
    """Every module-level assigned value, also those compress.py packed into one tuple assignment."""
    for st in tree.body:
        if isinstance(st, ast.Assign):
            packed = isinstance(st.targets[0], ast.Tuple) and isinstance(st.value, ast.Tuple)
            yield from st.value.elts if packed else [st.value]


def _is_presets(value) -> bool:
    """PRESETS, whatever the minifier named it: the module-level dict with the 'seed' and 'record' rows."""
    return (isinstance(value, ast.Dict)
            and {"seed", "record"} <= {k.value for k in value.keys if isinstance(k, ast.Constant)})


def script_defaults(path):
    """(defaults, presets) of the script's Hyperparameters and PRESETS: {field: value},
    {preset: {field: value}}.  Raises ValueError when the script has neither."""
    tree = script_source_tree(path)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters"), None)
    if cls is None:
        raise ValueError("no Hyperparameters class in the script")
    defaults = {st.target.id: _default(st.value) for st in cls.body
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.value is not None}
    presets = {}
    for value in _module_values(tree):
        if _is_presets(value):
            presets = {ast.literal_eval(k): _mapping(v) for k, v in zip(value.keys, value.values)}
    return defaults, presets


def config_changes(config: dict, defaults: dict, presets: dict) -> list:
    """[(field, value, default)] of the config's fields that differ from the script's defaults
    (under the config's preset; ``preset`` itself against the class default).  A field the script
    does not have gets default None.  Values compare as the log writes them (str())."""
    base = dict(defaults)
    base.update(presets.get(config.get("preset", defaults.get("preset")), {}))
    base["preset"] = defaults.get("preset")
    changes = []
    for key, value in config.items():
        if key in PER_SEED_FIELDS:
            continue
        if key not in base:
            changes.append((key, value, None))
        elif value != str(base[key]):
            changes.append((key, value, str(base[key])))
    return changes


# ---------------------------------------------------------------------------
# the checklist
# ---------------------------------------------------------------------------

def _who(run) -> str:
    return f"seed {run['seed']} ({os.path.basename(run['path'])})"


def _by_value(runs, fn) -> list:
    """'seed 1 (a.txt), seed 2 (b.txt)' per distinct fn(run), in first-seen order: [(value, text)]."""
    groups = {}
    for r in runs:
        groups.setdefault(fn(r), []).append(_who(r))
    return [(value, ", ".join(who)) for value, who in groups.items()]


def _fails_or(problems, ok_detail):
    return (False, "; ".join(problems)) if problems else (True, ok_detail)


def _check_finished(runs, summary, ctx):
    problems = [f"seed {e['seed']} ({e['log']}): {e['status']}: {e['reason']}" for e in summary["excluded"]]
    problems += [f"seed {seed}: failed, no log came back" for seed in summary["missing_seeds"]]
    kind = summary["score_kind"]
    line = sl.final_line_name(kind, summary["quant"]) if kind else "no final line"
    return _fails_or(problems, f"all {len(runs)} logs end their eval with {line}")


def _check_code_hash(runs, summary, ctx):
    want, name = ctx["code_sha256"], ctx["code_name"]
    other = [r for r in runs if r["code_sha256"] != want]
    problems = [f"{who}: no code_sha256 line" if sha is None else f"{who} ran code {sha}"
                for sha, who in _by_value(other, lambda r: r["code_sha256"])]
    if problems:
        problems.insert(0, f"{name} is {want}")
    return _fails_or(problems, f"every log's code_sha256 is {want}, the first 16 hex digits of "
                               f"sha256({name})")


def _config_key(run):
    config = {k: v for k, v in (run["config"] or {}).items() if k not in PER_SEED_FIELDS}
    config["(world_size)"] = str(run["world_size"])
    return config


def _check_same_config(runs, summary, ctx):
    problems = [f"{_who(r)} has no config: line" for r in runs if r["config"] is None]
    if problems:
        return False, "; ".join(problems)
    ref = _config_key(runs[0])
    for r in runs[1:]:
        other = _config_key(r)
        diff = [f"{k}={other.get(k, '(absent)')} vs {ref.get(k, '(absent)')}"
                for k in sorted(set(ref) | set(other)) if ref.get(k) != other.get(k)]
        if diff:
            problems.append(f"{_who(r)} differs from {_who(runs[0])}: {', '.join(diff)}")
    return _fails_or(problems, f"the {len(runs)} config: lines are equal apart from "
                               f"{' and '.join(PER_SEED_FIELDS)}, on world_size {runs[0]['world_size']}")


def _limit_check(runs, key, scale, limit, what, missing):
    problems, worst = [], 0.0
    for r in runs:
        if r[key] is None:
            problems.append(f"{_who(r)} has no {missing} line")
            continue
        secs = r[key] * scale
        worst = max(worst, secs)
        if secs > limit:
            problems.append(f"{_who(r)}: {what} {secs:.1f} s > {limit:.0f} s")
    return _fails_or(problems, f"{what} at most {worst:.1f} s (limit {limit:.0f} s)")


def _check_train_time(runs, summary, ctx):
    return _limit_check(runs, "train_hessians_ms", 1e-3, TRAIN_LIMIT_S, "training + Hessians",
                        "gptq:hessians ... train+hessians:")


def _check_eval_time(runs, summary, ctx):
    return _limit_check(runs, "eval_phase_s", 1.0, EVAL_LIMIT_S, "timed eval", "eval_phase_time:")


def _check_artifact_bytes(runs, summary, ctx):
    problems, sizes = [], []
    for r in runs:
        if r["bytes_total"] is None:
            problems.append(f"{_who(r)} has no 'Total submission size' line")
        elif r["bytes_total"] > sl.BYTES_LIMIT:
            problems.append(f"{_who(r)}: {r['bytes_total']:,} bytes > {sl.BYTES_LIMIT:,}")
        else:
            sizes.append(r["bytes_total"])
    return _fails_or(problems, f"largest artifact {max(sizes, default=0):,} bytes (limit {sl.BYTES_LIMIT:,})")


def _check_val_tokens(runs, summary, ctx):
    problems = [f"{_who(r)} has no val_tokens: line" for r in runs if r["val_tokens"] is None]
    prefix = [r for r in runs if (r["config"] or {}).get("val_max_tokens", "0") != "0"]
    problems += [f"{who} scored a prefix: val_max_tokens={n}"
                 for n, who in _by_value(prefix, lambda r: r["config"]["val_max_tokens"])]
    counts = sorted({r["val_tokens"] for r in runs if r["val_tokens"] is not None})
    if len(counts) > 1:
        logged = [r for r in runs if r["val_tokens"] is not None]
        problems.append("the seeds scored different token counts: " + "; ".join(
            f"{n:,} on {who}" for n, who in _by_value(logged, lambda r: r["val_tokens"])))
    vocab = (runs[0]["config"] or {}).get("vocab_size")
    want, source = ctx["val_tokens"], "--val-tokens"
    if want is None and vocab is not None and vocab.isdigit() and int(vocab) in FULL_VAL_TOKENS:
        want, source = FULL_VAL_TOKENS[int(vocab)], f"the full sp{vocab} set"
    if want is not None and counts and counts != [want]:
        problems.append(f"{', '.join(f'{c:,}' for c in counts)} tokens, not the {want:,} of {source}")
    if problems:
        return False, "; ".join(problems)
    if want is None:
        return True, (f"{counts[0]:,} tokens on every seed; only the equality across seeds was checked: "
                      f"no full count is known for vocab_size {vocab}, pass --val-tokens N")
    return True, f"{counts[0]:,} tokens on every seed = {source}"


def _check_seeds(runs, summary, ctx):
    seeds = [r["seed"] for r in runs]
    problems = [f"{os.path.basename(r['path'])} has no seed: line" for r in runs if r["seed"] is None]
    dup = sorted({s for s in seeds if s is not None and seeds.count(s) > 1})
    if dup:
        problems.append("repeated seed " + ", ".join(
            f"{s} in {', '.join(os.path.basename(r['path']) for r in runs if r['seed'] == s)}" for s in dup))
    distinct = len({s for s in seeds if s is not None})
    if distinct < 3:
        problems.append(f"{distinct} distinct seed(s), need 3")
    return _fails_or(problems, f"{distinct} distinct seeds: {', '.join(map(str, seeds))}")


def _check_significance(runs, summary, ctx):
    sig = summary["significance"]
    if sig is None:
        return False, "no baseline given: pass --baseline-loss X or --baseline-logs LOGS"
    return sig["significant"], sl.format_significance(sig)


_CHECK_FUNCS = {"finished": _check_finished, "code_hash": _check_code_hash, "same_config": _check_same_config,
                "train_time": _check_train_time, "eval_time": _check_eval_time,
                "artifact_bytes": _check_artifact_bytes, "val_tokens": _check_val_tokens,
                "seeds": _check_seeds, "significance": _check_significance}


def run_checks(runs, summary, code_sha, code_name="train_gpt.py", val_tokens=None) -> list:
    """[{name, title, ok, detail}] in CHECKS order; detail names every failing seed and file."""
    ctx = {"code_sha256": code_sha, "code_name": code_name, "val_tokens": val_tokens}
    checks = []
    for name, title in CHECKS:
        ok, detail = _CHECK_FUNCS[name](runs, summary, ctx)
        checks.append({"name": name, "title": title, "ok": ok, "detail": detail})
    return checks


def parse_allow(values) -> list:
    """``--allow`` values (each comma-separated) -> check names; unknown names raise RecordError."""
    names = [n.strip() for v in values or () for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECK_NAMES]
    if unknown:
        raise RecordError(f"--allow: unknown check {', '.join(unknown)}; "
                          f"the checks are {', '.join(CHECK_NAMES)}")
    return names


# ---------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------

def hardware_line(runs, hardware: str) -> str:
    """What ran the seeds: the logs' device and world size; a CUDA run's GPU model from ``hardware``
    (the trainer does not log it)."""
    worlds = sorted({r["world_size"] for r in runs if r["world_size"] is not None})
    devices = sorted({r["device"] for r in runs if r["device"]})
    versions = sorted({f"torch {r['torch']}, python {r['python']}" for r in runs if r["torch"]})
    logged = f"world_size {'/'.join(map(str, worlds)) or '?'}, device {'/'.join(devices) or '?'}"
    if devices == ["cpu"]:
        head = "CPU"
        logged += "; --hardware does not apply"
    else:
        head = f"{hardware} (given by --hardware; the logs do not name the GPU)"
    return f"{head}; from the logs: {logged}" + (f"; {'; '.join(versions)}" if versions else "")


def _n(v, digits=0):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def _table(runs, summary) -> list:
    kind = summary["score_kind"]
    quant = summary["quant"] or "int6"
    cols = [
        ("steps", lambda r: r["steps"], 0),
        ("ms/step", lambda r: r["step_avg_ms"], 2),
        ("train ms", lambda r: r["train_time_ms"], 0),
        ("train + Hessians ms", lambda r: r["train_hessians_ms"], 0),
        ("pre-quant bpb", lambda r: r["finals"].get("prequant", {}).get("val_bpb"), 5),
        (f"{quant} roundtrip bpb", lambda r: r["finals"].get("roundtrip", {}).get("val_bpb"), 5),
        (f"final bpb ({kind or '-'})", lambda r: r["finals"].get(kind, {}).get("val_bpb"), 5),
        ("eval s", lambda r: r["eval_phase_s"], 1),
        ("artifact bytes", lambda r: r["bytes_total"], 0),
    ]
    status = {row["path"]: row["status"] for row in summary["rows"]}
    lines = ["| seed | " + " | ".join(c for c, _, _ in cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for r in runs:
        seed = str(r["seed"]) + ("" if status[r["path"]] == "ok" else f" ({status[r['path']]})")
        lines.append(f"| {seed} | " + " | ".join(_n(fn(r), d) for _, fn, d in cols) + " |")
    done = [r for r in runs if status[r["path"]] == "ok"]
    for label, key in (("mean", "mean"), ("std", "std")):
        cells = [_n(sl._stats(fn(r) for r in done)[key], d if key == "mean" else max(d, 1))
                 for _, fn, d in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _settings_section(runs, code_name, defaults_info) -> list:
    config = next((r["config"] for r in runs if r["config"] is not None), None)
    if config is None:
        return ["No log has a `config:` line, so the settings are unknown."]
    if isinstance(defaults_info, str):
        shown = {k: v for k, v in config.items() if k not in PER_SEED_FIELDS}
        return [f"The defaults could not be read from `{code_name}` ({defaults_info}); the full config of "
                f"{_who(runs[0])}:", "", "```", " ".join(f"{k}={v}" for k, v in shown.items()), "```"]
    defaults, presets = defaults_info
    preset = config.get("preset", defaults.get("preset", "seed"))
    changes = config_changes(config, defaults, presets)
    intro = f"From the logs' `config:` lines, against the defaults of `{code_name}` with `PRESET={preset}`"
    if not changes:
        return [intro + ": none, every setting is the default."]
    lines = [intro + ":", "", "| setting | this run | default |", "| --- | --- | --- |"]
    for key, value, default in changes:
        lines.append(f"| `{key.upper()}` | {_cell(value)} | "
                     f"{'(not a setting of this script)' if default is None else _cell(default)} |")
    return lines


def _cell(value: str) -> str:
    return f"`{value}`" if value else "(empty)"


def _command(runs, changes) -> str:
    env = [f"{key.upper()}={shlex.quote(value)}" for key, value, default in changes if default is not None]
    nproc = runs[0]["world_size"] or 8
    return " ".join(["SEED=<seed>", *env, f"torchrun --standalone --nproc_per_node={nproc} train_gpt.py"])


def render_readme(runs, summary, checks, *, name, blurb, hardware, date, code_name="train_gpt.py",
                  defaults_info=None) -> str:
    """The folder's README.md text.  ``defaults_info``: (defaults, presets), or why they are unknown (str)."""
    sb, sloss = summary["stats"]["score_val_bpb"], summary["stats"]["score_val_loss"]
    kind = summary["score_kind"]
    line = sl.final_line_name(kind, summary["quant"]) if kind else "no common final line"
    out = [f"# {name}", "", f"{date}. {blurb}", "",
           f"**val_bpb {_n(sb['mean'], 5)} ± {_n(sb['std'], 5)}** (val_loss {_n(sloss['mean'], 5)} ± "
           f"{_n(sloss['std'], 5)} nats; mean ± sample std over {sb['n']} seeds, `{line}`); "
           f"largest artifact {_n(summary['bytes_total_max'])} bytes.", "", "## Results", ""]
    out += _table(runs, summary)
    sig = summary["significance"]
    out += ["", "Significance: " + (sl.format_significance(sig) if sig else "no baseline given."),
            "", f"Hardware: {hardware_line(runs, hardware)}.", "", "## Settings", ""]
    out += _settings_section(runs, code_name, defaults_info)
    if not isinstance(defaults_info, (str, type(None))) and runs[0]["config"] is not None:
        changes = config_changes(runs[0]["config"], *defaults_info)
        out += ["", "Each seed ran as:", "", "    " + _command(runs, changes)]
    out += ["", "## Checklist", "", "Verified from the logs by `tools/summarize_logs.py --records-dir`:", ""]
    for c in checks:
        if c["ok"]:
            out.append(f"- [x] {c['title']}: {c['detail']}")
        else:
            out.append(f"- [ ] **FAILED, allowed by `--allow {c['name']}`**: {c['title']}: {c['detail']}")
    out.append("- Score-first TTT cannot be read from a log: each chunk is scored before it is trained on, "
               "by construction of the eval (see the code).")
    same_code = next(c["ok"] for c in checks if c["name"] == "code_hash")
    code_note = ("the script that ran (its sha256 prefix is in every log)" if same_code
                 else "the shipped script; the logs ran another revision (see the checklist)")
    out += ["", "## Files", "", f"- `{code_name}`: {code_note}", "- `submission.json`"]
    out += [f"- `{os.path.basename(r['path'])}`: seed {r['seed']}" for r in runs] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------
# the folder
# ---------------------------------------------------------------------------

def check_paths(out_dir, code_path) -> None:
    """RecordError unless ``code_path`` is a file and ``out_dir`` is new (or an empty folder)."""
    if not os.path.isfile(code_path):
        raise RecordError(f"--code {code_path}: no such file; point it at the train_gpt.py that ran")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise RecordError(f"--records-dir {out_dir} already exists and is not empty; "
                          "remove it or pick another")


def make_record(runs, summary, submission: dict, out_dir, *, code_path, allow=(), val_tokens=None,
                hardware=DEFAULT_HARDWARE, name="", blurb="", date="", out=print) -> int:
    """Runs the checklist, prints it, and writes ``out_dir`` when every failing item is allowed.
    Returns 0 when written, 1 when a check failed that ``allow`` does not name."""
    check_paths(out_dir, code_path)
    basenames = [os.path.basename(r["path"]) for r in runs]
    clash = sorted({b for b in basenames if basenames.count(b) > 1} | ({"README.md", "submission.json",
                                                                           "train_gpt.py"} & set(basenames)))
    if clash:
        raise RecordError(f"logs named {', '.join(clash)} would collide in the folder; rename them")
    code_name = "train_gpt.py"
    checks = run_checks(runs, summary, code_sha256(code_path), code_name, val_tokens)
    allowed = set(allow)
    for c in checks:
        verdict = "PASS" if c["ok"] else ("ALLOWED" if c["name"] in allowed else "FAIL")
        out(f"check {c['name']}: {verdict}: {c['detail']}")
    for n in sorted(allowed - {c["name"] for c in checks if not c["ok"]}):
        out(f"note: --allow {n}: that check passed")
    blocking = [c["name"] for c in checks if not c["ok"] and c["name"] not in allowed]
    if blocking:
        out(f"records folder not written: {len(blocking)} check(s) failed: {', '.join(blocking)} "
            f"(fix them, or pass --allow {','.join(blocking)} to write it and say so in its README)")
        return 1
    try:
        defaults_info = script_defaults(code_path)
    except (ValueError, SyntaxError) as e:
        defaults_info = str(e)
    readme = render_readme(runs, summary, checks, name=name, blurb=blurb, hardware=hardware, date=date,
                           code_name=code_name, defaults_info=defaults_info)
    checklist = {c["name"]: "pass" if c["ok"] else "FAILED (allowed): " + c["detail"] for c in checks}
    sub = dict(submission, hardware=hardware_line(runs, hardware), checklist=checklist)
    tmp = os.path.abspath(out_dir) + ".partial"  # written whole, then renamed: never a half-built folder
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(readme)
        with open(os.path.join(tmp, "submission.json"), "w", encoding="utf-8") as fh:
            json.dump(sl._jsonable(sub), fh, indent=2)
            fh.write("\n")
        shutil.copyfile(code_path, os.path.join(tmp, code_name))
        for r in runs:
            shutil.copyfile(r["path"], os.path.join(tmp, os.path.basename(r["path"])))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out(f"wrote {out_dir}: README.md, submission.json, {code_name}, {len(runs)} log(s)")
    return 0
