"""tools/gpu_check.sh / tools/gpu_check.py: the --cpu run (the real artifact train_gpt.py, tiny) yields every key other
tools read, with real numbers; the budgets fit the deadline; on a fake clock every part ends inside its budget and the
JSON is on disk after each part; a part that hangs or crashes (a fake one, or a real process) is recorded and the
later parts still run.  No timing thresholds."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402


def check_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHON=sys.executable, **extra)
    return env


def positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def statuses(out):
    return {k: v["status"] for k, v in json.loads((out / "gpu_check.json").read_text())["parts"].items()}


@pytest.mark.slow
def test_cpu_run_of_the_artifact_writes_every_key(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu", str(out)], env=check_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["mode"] == "cpu" and report["torch"] and report["code_sha256"]
    assert isinstance(report["device"], str) and report["device"] not in ("", "unknown")
    assert statuses(out) == {p: "ok" for p in gpu_check.PARTS}
    assert all(e["seconds"] <= e["budget_s"] for e in report["parts"].values())
    for name in gpu_check.PRESETS:
        p = report["presets"][name]
        for key in ("tokens_per_s", "ms_per_step", "peak_mem_gib", "hessian_s", "projected_steps_600s_8xh100"):
            assert positive(p["train"][key]), (name, key, p["train"].get(key))
        assert p["train"]["attention"] == "sdpa" and p["train"]["grad_accum_steps"] == 8
        assert p["train"]["reference_steps"] == {"seed": 6291, "record": 4931}[name]
        assert p["settings"]["train"]["GRAD_ACCUM_STEPS"] == "8" and "SNAPSHOT" not in p["settings"]["train"]
        for key in ("sliding_tokens_per_s", "sliding_projected_s_8xh100", "ttt_projected_s_8xh100"):
            assert positive(p["eval"][key]), (name, key, p["eval"].get(key))
        assert isinstance(p["eval"]["within_600s"], bool) and not p["eval"]["ttt"]["budget_stopped"]
        assert p["eval"]["ttt"]["mode"] == {"seed": "chunk", "record": "phased"}[name]
        assert positive(p["quant"]["quantize_s"]) and positive(p["quant"]["total_bytes"]) and p["quant"]["fits"]
    record = report["presets"]["record"]
    assert positive(record["train"]["ms_per_step_pre_loop"]) and positive(record["train"]["ms_per_step_post_loop"])
    assert record["quant"]["awq"] and record["eval"]["ttt"]["sample_docs"] > 0  # the AWQ-lite probe ran
    assert report["presets"]["seed"]["quant"]["awq"] is None and record["settings"]["ttt"]["TTT_ENABLED"] == "1"
    table = (out / "gpu_check.md").read_text()
    assert "| record.ttt | ok |" in table and "projected steps in 600 s" in table
    assert (out / "logs" / "record_train.txt").exists() and not (out / "compile_cache").exists()


def test_budgets_fit_the_deadline():
    for mode, sizes in gpu_check.SIZES.items():
        budgets, deadline = sizes["budgets"], sizes["deadline"]
        assert set(budgets) == set(gpu_check.PARTS)
        for preset in gpu_check.PRESETS:  # one call per preset at least; the record's first
            assert sizes["setup"] + sum(budgets[f"{preset}.{k}"] for k in gpu_check.KINDS) <= deadline, (mode, preset)
    assert gpu_check.PARTS[:4] == ["record.train", "record.quant", "record.ttt", "record.eval"]
    cpu = gpu_check.SIZES["cpu"]
    assert cpu["setup"] + sum(cpu["budgets"].values()) <= cpu["deadline"]  # --cpu: everything in one call


def test_every_variable_the_check_sets_is_a_trainer_setting():
    import dataclasses

    import train_gpt_human as tg
    names = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    envs = [gpu_check.COMMON_ENV, *gpu_check.PART_ENV.values(), *gpu_check.PRESET_PART_ENV.values()]
    for sizes in gpu_check.SIZES.values():
        envs += [sizes["env"], *sizes["preset_env"].values()]
    assert {k for env in envs for k in env} - names == {"OMP_NUM_THREADS"}
    assert {"SNAPSHOT", "EVAL_ARTIFACT", "VAL_MAX_TOKENS", "ITERATIONS", "AWQ_GROUPS"} <= names


def run_dry(tmp_path, monkeypatch, *extra):
    """The dry run; returns (exit status, report, [(part, statuses on disk right after it finished)])."""
    out, seen, finish = tmp_path / "dry", [], gpu_check.Check.finish

    def recording(self, name, *args, **kwargs):
        finish(self, name, *args, **kwargs)
        seen.append((name, statuses(out)))

    monkeypatch.setattr(gpu_check.Check, "finish", recording)
    clock = gpu_check.FakeClock()
    rc = gpu_check.main(["--dry-run", "--out", str(out), *extra], clock=clock)
    report = json.loads((out / "gpu_check.json").read_text())
    assert clock.now <= report["deadline_s"] and (out / "gpu_check.md").exists()
    return rc, report, seen


def test_dry_run_on_a_fake_clock_keeps_every_part_inside_its_budget(tmp_path, monkeypatch):
    rc, report, seen = run_dry(tmp_path, monkeypatch, "--parts", "record")
    assert rc == 0 and [name for name, _ in seen] == gpu_check.PARTS[:4]
    for k, (name, on_disk) in enumerate(seen):  # the JSON on disk after each part: it and those before are final
        assert all(on_disk[p] == "ok" for p, _ in seen[:k + 1]) and all(
            on_disk[p] == "pending" for p, _ in seen[k + 1:])
    assert all(e["status"] == "ok" and e["seconds"] <= e["budget_s"] for e in report["parts"].values())
    train, ev = report["presets"]["record"]["train"], report["presets"]["record"]["eval"]
    assert train["ms_per_step_pre_loop"] == train["ms_per_step_post_loop"] == train["ms_per_step"] == 1000
    assert train["peak_mem_gib"] == 60 and train["attention"] == "fa3" and report["torch"] == "2.13.0"
    assert ev["ttt"]["tokens_per_s"] == 300000 / 25 and positive(ev["ttt_projected_s_8xh100"])


def test_dry_run_with_a_hang_and_a_crash_records_both_and_goes_on(tmp_path, monkeypatch):
    rc, report, seen = run_dry(tmp_path, monkeypatch, "--fail", "record.ttt:hang", "--fail", "seed.train:crash",
                               "--deadline", "2000")
    assert rc == 3 and not report["ok"]
    parts = report["parts"]
    assert [parts[p]["status"] for p in gpu_check.PARTS] == ["ok", "ok", "timeout", "ok", "failed", "skipped",
                                                            "skipped", "skipped"]
    assert parts["record.ttt"]["seconds"] == pytest.approx(parts["record.ttt"]["budget_s"], abs=1)
    assert "timeout" in parts["record.ttt"]["error"] and "final_int6_ttt_exact" in parts["record.ttt"]["error"]
    assert "forced failure" in parts["seed.train"]["error"] and "no snapshot" in parts["seed.quant"]["error"]
    assert "no artifact" in parts["seed.ttt"]["error"] and "no artifact" in parts["seed.eval"]["error"]
    assert positive(report["presets"]["record"]["eval"]["sliding_tokens_per_s"])  # the part after the hang ran
    assert "timeout" in report["presets"]["record"]["eval"]["ttt_error"]  # what the hung part logged is kept too
    assert report["presets"]["record"]["eval"]["ttt"]["tokens_per_s"] == 12000
    assert [name for name, _ in seen] == gpu_check.PARTS


FAKE_TRAINER = """
import os, subprocess, sys, time
sys.path.insert(0, {tools!r})
from gpu_check import fake_lines
preset, kind = os.environ["RUN_ID"].split("_")
if preset == "record":  # hangs, with a child of its own
    child = subprocess.Popen(["sleep", "60"])
    open(os.path.join({tmp!r}, "child.pid"), "w").write(str(child.pid))
    print("world_size:1 grad_accum_steps:8 device:cpu", flush=True)
    time.sleep(60)
for line in fake_lines(preset, kind):
    print(line, flush=True)
if kind in ("train", "quant"):
    time.sleep(60)  # a real run goes on after its snapshot or artifact; the check stops it
"""


def test_a_real_process_past_its_limit_is_killed_with_its_children(tmp_path):
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER.format(tools=str(REPO / "tools"), tmp=str(tmp_path)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--cpu", "--out", str(out),
                           "--trainer", str(fake), "--budget", "record.train=3"], env=check_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert statuses(out) == {"record.train": "timeout", "record.quant": "skipped", "record.ttt": "skipped",
                             "record.eval": "skipped", "seed.train": "ok", "seed.quant": "ok", "seed.ttt": "ok",
                             "seed.eval": "ok"}
    report = json.loads((out / "gpu_check.json").read_text())
    assert "world_size:1" in report["parts"]["record.train"]["error"]  # the log's tail
    assert report["presets"]["seed"]["train"]["ms_per_step"] == 1000
    status = Path(f"/proc/{(tmp_path / 'child.pid').read_text()}/status")  # the hung trainer's child went with it
    assert not status.exists() or "State:\tZ" in status.read_text()


def test_synthetic_stream_is_bos_separated_log_normal_documents():
    tokens = gpu_check.synthetic_stream(200_000, 800, 8192, seed=3)
    assert tokens.dtype == np.uint16 and len(tokens) == 200_000 and tokens[0] == 1 and tokens.max() < 8192
    lengths = np.diff(np.flatnonzero(tokens == 1))
    assert (tokens == 0).sum() == 0 and lengths.min() >= 8
    assert 600 < lengths.mean() < 1000 and np.median(lengths) < lengths.mean()  # skewed: log-normal


def test_a_stopped_check_records_the_part_in_flight_and_ends_its_process(tmp_path):
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER.format(tools=str(REPO / "tools"), tmp=str(tmp_path)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--cpu", "--out", str(out),
                             "--trainer", str(fake)], env=check_env(), cwd=REPO, stdout=subprocess.DEVNULL)
    for _ in range(600):  # until the record's train run (which hangs) is under way
        if (tmp_path / "child.pid").exists() and (tmp_path / "child.pid").read_text():
            break
        time.sleep(0.05)
    proc.terminate()  # as an outer time limit would
    assert proc.wait(timeout=60) == 143
    assert statuses(out) == {"record.train": "failed", **{p: "skipped" for p in gpu_check.PARTS[1:]}}
    assert "stopped" in json.loads((out / "gpu_check.json").read_text())["parts"]["record.train"]["error"]
    status = Path(f"/proc/{(tmp_path / 'child.pid').read_text()}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()
