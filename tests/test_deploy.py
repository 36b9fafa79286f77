"""Tests for deploy_runpod.sh and deploy_3seeds.sh with local ssh/scp shims.

The scripts are copied into a temporary "repo" together with fake submission
files and a fake run.sh that writes a spec-format log.  SSH/SCP point at shims
that record their argv and emulate the pod: the ssh shim runs the remote
command with ``sh -c`` in a sandbox home, the scp shim maps ``user@host:PATH``
to the local PATH (REMOTE_DIR is an absolute path inside the sandbox).  A fake
``pip`` on the shim's PATH records its arguments.  The real logs/ is never used.
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("deploy_runpod.sh", "deploy_3seeds.sh")
HOST = "root@203.0.113.7"

SSH_SHIM = r'''#!{python}
import json, os, signal, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["SHIM_LOG"], "a") as fh:
    fh.write(json.dumps({{"prog": "ssh", "argv": argv}}) + "\n")
with_arg = set("bcDEeFIiJLlmOopQRSWw")
i = 0
while i < len(argv) and argv[i].startswith("-"):
    i += 2 if argv[i][1:] in with_arg else 1
host, cmd = argv[i], " ".join(argv[i + 1:])
home = os.environ["SHIM_HOME"]
env = dict(os.environ, PATH=os.environ["SHIM_BIN"] + os.pathsep + os.environ["PATH"], HOME=home)
os.chdir(home)
if os.environ.get("SHIM_DROP_FOLLOW") and "tail " in cmd and not os.path.exists(".dropped"):
    open(".dropped", "w").close()
    # emulate a connection that dies after two lines of the followed log
    p = subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE, env=env, start_new_session=True)
    for _ in range(2):
        sys.stdout.buffer.write(p.stdout.readline())
    sys.stdout.flush()
    os.killpg(p.pid, signal.SIGTERM)
    p.wait()
    sys.exit(255)
os.execvpe("sh", ["sh", "-c", cmd], env)
'''

SCP_SHIM = r'''#!{python}
import json, os, re, shutil, sys
argv = sys.argv[1:]
with open(os.environ["SHIM_LOG"], "a") as fh:
    fh.write(json.dumps({{"prog": "scp", "argv": argv, "cwd": os.getcwd()}}) + "\n")
with_arg = set("cDFiJloPSX")
i = 0
while i < len(argv) and argv[i].startswith("-"):
    i += 2 if argv[i][1:] in with_arg else 1
paths = [re.sub(r"^[^/:@]+@[^:/]+:", "", p) for p in argv[i:]]
*srcs, dst = paths
rc = 0
for s in srcs:
    if not os.path.isfile(s):
        sys.stderr.write("scp: %s: No such file or directory\n" % s)
        rc = 1
        continue
    target = os.path.join(dst, os.path.basename(s)) if (dst.endswith("/") or os.path.isdir(dst)) else dst
    shutil.copyfile(s, target)
sys.exit(rc)
'''

FAKE_PIP = """#!/bin/sh
echo "$PWD $*" >> "$PIP_LOG"
"""

# Fake run.sh: writes a log in the trainer's format (code_sha256 of the uploaded train_gpt.py, config,
# val_tokens of the full sp1024 set, train+hessians, eval_phase_time); FAKE_MODE=crash|hang|stall changes
# the ending (stall: waits 30 s before its final lines); FAKE_CRASH_SEED=S crashes only seed S.
FAKE_RUN = r"""#!/usr/bin/env bash
set -u
echo "SEED=${SEED:-} RUN_ID=${RUN_ID:-} A=${A:-} B=${B:-} TTT_ENABLED=${TTT_ENABLED:-}" > "env_seen_${SEED}.txt"
mkdir -p logs
LOG="logs/${RUN_ID}.txt"
say() { echo "$1"; echo "$1" >> "$LOG"; }
# loss depends on the seed so that summaries differ per seed
d=$(( SEED % 7 ))
say "seed:${SEED}"
say "code_sha256:$(sha256sum train_gpt.py | cut -c1-16) python:3.12.3 torch:2.9.1+cu128 brotli:True"
say "config: preset=seed vocab_size=1024 run_id=${RUN_ID} seed=${SEED} val_max_tokens=0 \
ttt_enabled=${TTT_ENABLED:-1}"
say "val_tokens:62021846 val_docs:50000 train_shards:80 bytes:tokenizer"
say "world_size:8 grad_accum_steps:1 device:cuda"
say "model_params:27000000"
say "step:0/200 val_loss:6.9300 val_bpb:4.1000 train_time:0ms step_avg:0.01ms"
say "step:100/200 train_loss:3.1234 train_time:8700ms step_avg:87.00ms"
say "step:200/200 val_loss:2.0123 val_bpb:1.1918 train_time:17400ms step_avg:87.00ms"
if [ "${FAKE_MODE:-}" = crash ] || [ "${FAKE_CRASH_SEED:-}" = "$SEED" ]; then
  echo "Traceback: boom" >&2; exit 3
fi
if [ "${FAKE_MODE:-}" = stall ]; then sleep 30; fi
say "gptq:hessians batches:64 time:3000ms reserve:12000ms train+hessians:20400ms cap:600000ms within_cap:True"
say "peak memory allocated: 21034 MiB reserved: 22050 MiB"
say "final_prequant_exact val_loss:1.9345678${d} val_bpb:1.1456789${d}"
say "Serialized model int6+brotli: 15912345 bytes"
say "Code size: 61234 bytes"
say "Total submission size int6+brotli: 1597357${d} bytes"
say "final_int6_roundtrip_exact val_loss:1.9400000${d} val_bpb:1.1490000${d}"
say "final_int6_sliding_window_exact val_loss:1.9200000${d} val_bpb:1.1370000${d} eval_time:81234ms"
if [ "${TTT_ENABLED:-1}" != 0 ]; then
  say "final_int6_ttt_exact val_loss:1.88${d}00000 val_bpb:1.11${d}00000 eval_time:412345ms chunks_adapted:1892/1893"
fi
say "eval_phase_time:493.6s (timed: sliding and TTT)"
if [ "${FAKE_MODE:-}" = hang ]; then sleep 30; fi
exit 0
"""


def _write_exec(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class Sandbox:
    def __init__(self, root: Path):
        self.root = root
        self.repo = root / "repo"
        self.home = root / "pod"
        self.bin = root / "shimbin"
        self.remote = self.home / "workspace" / "parameter-golf"
        self.shim_log = root / "shim_calls.jsonl"
        self.pip_log = root / "pip_calls.txt"
        self.key = root / "id_test_key"
        for d in (self.repo / "data", self.repo / "tools", self.home, self.bin):
            d.mkdir(parents=True, exist_ok=True)
        for s in SCRIPTS:
            shutil.copy2(REPO / s, self.repo / s)
        for tool in ("summarize_logs.py", "record_folder.py"):
            shutil.copy2(REPO / "tools" / tool, self.repo / "tools" / tool)
        (self.repo / "train_gpt.py").write_text("print('fake compressed trainer')\n")
        (self.repo / "requirements.txt").write_text("numpy\n")
        (self.repo / "data" / "fineweb.py").write_text("# fake data downloader\n")
        _write_exec(self.repo / "run.sh", FAKE_RUN)
        _write_exec(self.bin / "ssh", SSH_SHIM.format(python=sys.executable))
        _write_exec(self.bin / "scp", SCP_SHIM.format(python=sys.executable))
        _write_exec(self.bin / "pip", FAKE_PIP)
        self.key.write_text("not a real key\n")

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items()
               if k not in ("SSH", "SCP", "PORT", "KEY", "ENV_PASS", "RUN_ID", "SKIP_PIP", "REMOTE_DIR",
                            "SEEDS", "RUN_PREFIX", "BASELINE_LOSS", "SUMMARY_ARGS", "LOCAL_LOG_DIR",
                            "FINAL_RE", "SSH_OPTS", "RECORDS", "RECORD_DIR", "RECORD_ARGS", "RECORD_NAME",
                            "RECORD_AUTHOR", "RECORD_GITHUB_ID", "RECORD_BLURB", "RECORD_HARDWARE")}
        env.update(SSH=str(self.bin / "ssh"), SCP=str(self.bin / "scp"), SHIM_LOG=str(self.shim_log),
                   SHIM_HOME=str(self.home), SHIM_BIN=str(self.bin), PIP_LOG=str(self.pip_log),
                   REMOTE_DIR=str(self.remote), TAIL_SLEEP="0.1", FINAL_WAIT="10", RETRY_SLEEP="0",
                   MPLBACKEND="Agg")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, script, *args, timeout=90, **env):
        return subprocess.run(["bash", str(self.repo / script), *map(str, args)], cwd=self.root,
                              env=self.env(**env), capture_output=True, text=True, timeout=timeout)

    def calls(self, prog=None):
        if not self.shim_log.exists():
            return []
        rows = [json.loads(line) for line in self.shim_log.read_text().splitlines()]
        return [r for r in rows if prog is None or r["prog"] == prog]

    def pip_calls(self):
        return self.pip_log.read_text().splitlines() if self.pip_log.exists() else []

    def kill_remote(self, run_id):
        pid_file = self.remote / "logs" / f"{run_id}.pid"
        if pid_file.exists():
            # the run was started under setsid, so its pid leads its own process group
            pid = int(pid_file.read_text().strip())
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


@pytest.fixture
def sb():
    # own temp dir: REMOTE_DIR must be made of [A-Za-z0-9_./-] only
    root = Path(tempfile.mkdtemp(prefix="pg_deploy_"))
    box = Sandbox(root)
    yield box
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def real_logs_untouched():
    logs = REPO / "logs"
    before = sorted(p.name for p in logs.iterdir()) if logs.is_dir() else None
    yield
    after = sorted(p.name for p in logs.iterdir()) if logs.is_dir() else None
    assert before == after, "tests must not write into the real logs/"


def _ssh_cmd(call):
    """The remote command of a recorded ssh call (everything after the host)."""
    argv = call["argv"]
    return " ".join(argv[argv.index(HOST) + 1:])


def _scp_positionals(argv):
    """Source and target arguments of a recorded scp call (options and their values dropped)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i][1:] in set("cDFiJloPSX") else 1
    return argv[i:]


# ---------------------------------------------------------------------------
# deploy_runpod.sh
# ---------------------------------------------------------------------------

def test_deploy_single_seed(sb):
    r = sb.run("deploy_runpod.sh", HOST, 42, PORT=22022, KEY=sb.key, ENV_PASS="A=1 B=2", RUN_ID="t_seed42")
    assert r.returncode == 0, r.stdout + r.stderr

    # files went up, unchanged
    for f in ("train_gpt.py", "run.sh", "requirements.txt", "data/fineweb.py"):
        assert (sb.remote / f).read_bytes() == (sb.repo / f).read_bytes(), f

    ssh_calls, scp_calls = sb.calls("ssh"), sb.calls("scp")
    assert ssh_calls and scp_calls
    for c in ssh_calls:
        a = c["argv"]
        assert a[a.index("-p") + 1] == "22022" and a[a.index("-i") + 1] == str(sb.key)
        assert "-P" not in a and HOST in a
    for c in scp_calls:
        a = c["argv"]
        assert a[a.index("-P") + 1] == "22022" and a[a.index("-i") + 1] == str(sb.key)
        assert "-p" not in a

    # upload: the four files to the remote dir
    uploaded = set()
    for c in scp_calls:
        a = c["argv"]
        if a[-1].startswith(HOST + ":"):
            uploaded |= {os.path.normpath(os.path.join(c["cwd"], s)) for s in _scp_positionals(a)[:-1]}
            assert a[-1] in (f"{HOST}:{sb.remote}/", f"{HOST}:{sb.remote}/data/")
    assert uploaded == {str(sb.repo / f) for f in ("train_gpt.py", "run.sh", "requirements.txt", "data/fineweb.py")}

    # remote commands: pip install, run.sh with SEED and user env, detached
    cmds = [_ssh_cmd(c) for c in ssh_calls]
    assert any("pip install -r requirements.txt" in c for c in cmds)
    start = [c for c in cmds if "run.sh" in c]
    assert len(start) == 1
    assert "'SEED=42'" in start[0] and "'A=1'" in start[0] and "'B=2'" in start[0]
    assert "'RUN_ID=t_seed42'" in start[0] and "nohup" in start[0] and "setsid" in start[0]
    assert sb.pip_calls() == [f"{sb.remote} install -r requirements.txt"]
    # pip ran before run.sh was started
    assert min(i for i, c in enumerate(cmds) if "pip install" in c) < cmds.index(start[0])
    # the run really ran remotely with that env
    assert (sb.remote / "env_seen_42.txt").read_text().split() == [
        "SEED=42", "RUN_ID=t_seed42", "A=1", "B=2", "TTT_ENABLED="]

    # logs came back into the temp repo's logs/
    local = sb.repo / "logs" / "t_seed42.txt"
    assert local.read_text() == (sb.remote / "logs" / "t_seed42.txt").read_text()
    assert "final_int6_ttt_exact" in local.read_text()
    assert (sb.repo / "logs" / "t_seed42.stdout.txt").read_text() == \
        (sb.remote / "logs" / "t_seed42.stdout.txt").read_text()
    # the followed output was shown locally
    assert "final_int6_ttt_exact val_loss:1.8800000" in r.stdout
    assert "final line seen" in r.stderr


def test_default_seed_run_id_and_no_port_key(sb):
    r = sb.run("deploy_runpod.sh", HOST, SKIP_PIP=1)
    assert r.returncode == 0, r.stderr
    assert sb.pip_calls() == []
    assert (sb.remote / "env_seen_1337.txt").exists()
    logs = sorted(p.name for p in (sb.repo / "logs").glob("seed1337_*.txt"))
    assert len(logs) == 2  # <run_id>.txt and <run_id>.stdout.txt
    for c in sb.calls():
        assert "-p" not in c["argv"] and "-P" not in c["argv"] and "-i" not in c["argv"]


def test_ttt_disabled_stops_at_sliding_line(sb):
    r = sb.run("deploy_runpod.sh", HOST, 7, ENV_PASS="TTT_ENABLED=0", RUN_ID="nottt", SKIP_PIP=1)
    assert r.returncode == 0, r.stderr
    text = (sb.repo / "logs" / "nottt.txt").read_text()
    assert "final_int6_sliding_window_exact" in text and "ttt_exact" not in text


def test_crashing_run_fails_but_brings_logs_back(sb):
    r = sb.run("deploy_runpod.sh", HOST, 5, ENV_PASS="FAKE_MODE=crash", RUN_ID="crash", SKIP_PIP=1)
    assert r.returncode == 1
    assert "exited with status 3" in r.stderr and "FAILED" in r.stderr
    assert "step:200/200" in (sb.repo / "logs" / "crash.txt").read_text()
    assert "Traceback: boom" in (sb.repo / "logs" / "crash.stdout.txt").read_text()


def test_interrupted_follow_still_brings_logs_back(sb):
    """Ctrl-C while following a run that has not finished: the run goes on, the logs so far come back."""
    env = sb.env(ENV_PASS="FAKE_MODE=stall", RUN_ID="intr", SKIP_PIP=1)
    p = subprocess.Popen(["bash", str(sb.repo / "deploy_runpod.sh"), HOST, "3"], cwd=sb.root, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    followed = sb.repo / "logs" / "intr.stdout.txt"
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not (followed.exists() and "step:200/200" in followed.read_text()):
            time.sleep(0.1)
        assert "step:200/200" in followed.read_text()
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        sb.kill_remote("intr")
    assert p.returncode == 130, err
    assert "interrupted: the run goes on" in err and "log copied to" in err
    text = (sb.repo / "logs" / "intr.txt").read_text()
    assert "step:200/200" in text and "final_" not in text


def test_hanging_run_stops_following_after_final_line(sb):
    t0 = time.time()
    try:
        r = sb.run("deploy_runpod.sh", HOST, 9, ENV_PASS="FAKE_MODE=hang", RUN_ID="hang", SKIP_PIP=1,
                   FINAL_WAIT=1, timeout=60)
    finally:
        sb.kill_remote("hang")
    assert r.returncode == 0, r.stderr
    assert time.time() - t0 < 25, "follow did not stop at the final line"
    assert "still running" in r.stderr
    assert "final_int6_ttt_exact" in (sb.repo / "logs" / "hang.txt").read_text()


def test_follow_reconnects_without_duplicating_output(sb):
    r = sb.run("deploy_runpod.sh", HOST, 11, RUN_ID="drop", SKIP_PIP=1, SHIM_DROP_FOLLOW=1)
    assert r.returncode == 0, r.stderr
    assert "reconnecting" in r.stderr
    remote_out = (sb.remote / "logs" / "drop.stdout.txt").read_text()
    # followed once, up to the final line (the copy brought the rest back)
    assert remote_out.startswith(r.stdout) and r.stdout.endswith("chunks_adapted:1892/1893\n")
    assert (sb.repo / "logs" / "drop.stdout.txt").read_text() == remote_out
    follows = [c for c in sb.calls("ssh") if "tail " in _ssh_cmd(c)]
    assert len(follows) == 2 and "-c +1 " in _ssh_cmd(follows[0]) and "-c +1 " not in _ssh_cmd(follows[1])


def test_missing_local_file_is_an_error(sb):
    (sb.repo / "data" / "fineweb.py").unlink()
    r = sb.run("deploy_runpod.sh", HOST, 1)
    assert r.returncode == 1 and "missing local file" in r.stderr
    assert sb.calls() == []


@pytest.mark.parametrize("args", [
    [], ["justahost"], ["user@"], ["@host"], ["user@host;rm -rf /"], ["user@host", "notaseed"],
    ["user@host", "1", "extra"], ["-p", "22"],
])
def test_bad_arguments_usage_exit_2(sb, args):
    r = sb.run("deploy_runpod.sh", *args)
    assert r.returncode == 2
    assert "usage:" in r.stderr
    assert sb.calls() == []


def test_bad_env_pass_rejected(sb):
    r = sb.run("deploy_runpod.sh", HOST, 1, ENV_PASS="A=1 notakv")
    assert r.returncode == 1 and "ENV_PASS" in r.stderr
    assert sb.calls() == []


# ---------------------------------------------------------------------------
# deploy_3seeds.sh
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_three_seeds_summary_and_records_folder(sb):
    record = sb.root / "rec" / "2025-01-02_t3"
    r = sb.run("deploy_3seeds.sh", HOST, PORT=2200, KEY=sb.key, RUN_PREFIX="t3", BASELINE_LOSS="1.95",
               ENV_PASS="A=x", RECORD_DIR=record, RECORD_NAME="My Record", RECORD_AUTHOR="A. Person",
               RECORD_BLURB="What changed: nothing real.", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = sb.repo / "logs"
    for seed in (42, 1337, 2025):
        assert (logs / f"t3_seed{seed}.txt").exists()
        assert (sb.remote / f"env_seen_{seed}.txt").read_text().startswith(f"SEED={seed} RUN_ID=t3_seed{seed} A=x")
    starts = [_ssh_cmd(c) for c in sb.calls("ssh") if "run.sh" in _ssh_cmd(c)]
    assert ["'SEED=42'" in starts[0], "'SEED=1337'" in starts[1], "'SEED=2025'" in starts[2]] == [True] * 3
    assert len(sb.pip_calls()) == 1  # requirements installed once
    summary = (logs / "t3_summary.txt").read_text()
    assert "one_sample_constant_baseline" in summary and "score (ttt)" in summary
    sub = json.loads((logs / "t3_submission.json").read_text())
    assert sub["seeds"] == [42, 1337, 2025] and sub["name"] == "My Record" and sub["author"] == "A. Person"
    # fake losses: 1.88<seed % 7>: 42 -> 1.880, 1337 -> 1.880, 2025 -> 1.882
    assert sub["val_loss"] == pytest.approx((1.880 + 1.880 + 1.882) / 3)
    assert sub["bytes_total"] == 15973572
    assert (logs / "t3_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the records folder, every check passed
    assert "records folder built" in r.stderr and r.stderr.count(": PASS: ") == 9
    assert sorted(p.name for p in record.iterdir()) == [
        "README.md", "submission.json", "t3_seed1337.txt", "t3_seed2025.txt", "t3_seed42.txt", "train_gpt.py"]
    assert (record / "train_gpt.py").read_bytes() == (sb.repo / "train_gpt.py").read_bytes()
    readme = (record / "README.md").read_text()
    assert readme.startswith("# My Record\n") and "What changed: nothing real." in readme
    row = "| 2025 | 200 | 87.00 | 17,400 | 20,400 | 1.14568 | 1.14900 | 1.11200 | 493.6 | 15,973,572 |"
    assert row in readme.splitlines()
    assert json.loads((record / "submission.json").read_text())["val_loss"] == pytest.approx(sub["val_loss"])


@pytest.mark.slow
def test_three_seeds_failed_middle_seed(sb):
    record = sb.root / "rec" / "f3"
    r = sb.run("deploy_3seeds.sh", HOST, RUN_PREFIX="f3", SKIP_PIP=1, BASELINE_LOSS="1.95",
               ENV_PASS="FAKE_CRASH_SEED=1337", RECORD_DIR=record, timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr
    # the seed after the failed one still ran
    assert [(sb.remote / f"env_seen_{s}.txt").exists() for s in (42, 1337, 2025)] == [True] * 3
    assert "seed 1337 failed (status 1); going on with the next seed" in r.stderr
    # its log came back and the summary marks it, out of the mean
    assert "Traceback: boom" in (sb.repo / "logs" / "f3_seed1337.stdout.txt").read_text()
    summary = (sb.repo / "logs" / "f3_summary.txt").read_text()
    assert "FAILED: seed 1337 (f3_seed1337.txt): no final_*_exact score line" in summary
    assert "finished: 2 of 3 seeds" in summary
    sub = json.loads((sb.repo / "logs" / "f3_submission.json").read_text())
    assert sub["seeds"] == [42, 2025] and sub["val_loss"] == pytest.approx((1.880 + 1.882) / 2)
    assert "did not finish: 1337; the records folder is not built" in r.stderr
    assert not record.exists()


@pytest.mark.slow
def test_three_seeds_reports_failed_seed(sb):
    r = sb.run("deploy_3seeds.sh", HOST, RUN_PREFIX="f3", SEEDS="1 2", SKIP_PIP=1,
               ENV_PASS="FAKE_MODE=crash", timeout=120)
    assert r.returncode == 1
    assert "did not finish: 1 2" in r.stderr
    summary = (sb.repo / "logs" / "f3_summary.txt").read_text()
    assert "FAILED: seed 1 (f3_seed1.txt)" in summary and "FAILED: seed 2 (f3_seed2.txt)" in summary


@pytest.mark.slow
def test_three_seeds_checklist_failure_exits_1(sb):
    """Every seed finished, but without a baseline the improvement test fails: no folder, status 1."""
    record = sb.root / "rec" / "nb"
    r = sb.run("deploy_3seeds.sh", HOST, RUN_PREFIX="nb", SEEDS="5 6 7", SKIP_PIP=1, RECORD_DIR=record,
               timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "check significance: FAIL: no baseline given" in r.stderr
    assert "the records folder was not built" in r.stderr and not record.exists()
    r = sb.run("deploy_3seeds.sh", HOST, RUN_PREFIX="nb2", SEEDS="5 6 7", SKIP_PIP=1, RECORD_DIR=record,
               RECORD_ARGS="--allow significance", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "**FAILED, allowed by `--allow significance`**" in (record / "README.md").read_text()


@pytest.mark.parametrize("args", [[], ["nohost"], [HOST, "42"]])
def test_three_seeds_bad_arguments(sb, args):
    r = sb.run("deploy_3seeds.sh", *args)
    assert r.returncode == 2 and "usage:" in r.stderr
    assert sb.calls() == []


# ---------------------------------------------------------------------------
# static checks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed")
    r = subprocess.run([exe, "-x", str(REPO / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_executable(script):
    assert os.access(REPO / script, os.X_OK)
