"""A failed run loses nothing: the eval reruns from the saved artifact, a dead rank ends the run in seconds, and every
fault prints one line that names the rank, the phase and the cause.  Tiny CPU runs, gloo ranks under torchrun."""
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, final_metric, run_script

SCRIPT = REPO / "train_gpt_human.py"

# The trainer run as its own __main__, with one function replaced by one that kills this process (SIGKILL: no
# handler, no last words) on rank KILL_RANK at its KILL_AT-th call; the kill's time goes to killed_at.txt.
KILLER = '''
import os, signal, sys, time
source = open(os.environ["TRAINER"]).read()
head, main_block = source.split('if __name__ == "__main__":')
ns = {"__name__": "trainer", "__file__": os.environ["TRAINER"]}
exec(compile(head, os.environ["TRAINER"], "exec"), ns)
name, calls, original = os.environ["KILL_IN"], [0], ns[os.environ["KILL_IN"]]


def killing(*args, **kwargs):
    calls[0] += 1
    if int(os.environ.get("RANK", 0)) == int(os.environ["KILL_RANK"]) and calls[0] == int(os.environ["KILL_AT"]):
        open("killed_at.txt", "w").write(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)


ns[name] = killing
exec(compile("if True:" + main_block, os.environ["TRAINER"], "exec"), dict(ns, __name__="__main__"))
'''


def killed_run(tiny_env, tmp_path, kill_in, kill_rank, kill_at):
    worker = tmp_path / "killer.py"
    worker.write_text(KILLER)
    env = dict(tiny_env, TRAINER=str(SCRIPT), KILL_IN=kill_in, KILL_RANK=str(kill_rank), KILL_AT=str(kill_at))
    rc, out = run_script(worker, env, tmp_path, nproc=2, timeout=300)
    exited = time.time()
    killed = float((tmp_path / "killed_at.txt").read_text())
    return rc, out, exited - killed


@pytest.mark.parametrize("kill_in, kill_rank, kill_at, phase", [
    ("train_step", 1, 5, "training"),  # rank 1 dies at its 5th training step
    ("quantize_model", 0, 1, "packing"),  # rank 0 dies while packing; rank 1 is waiting for the artifact
    ("adapt_on_chunk", 1, 2, "ttt"),  # rank 1 dies in its first timed TTT step (the warm-up's was the 1st)
])
def test_a_dead_rank_ends_the_run_in_seconds_with_a_line_that_names_the_phase(tiny_env, tmp_path, kill_in, kill_rank,
                                                                               kill_at, phase):
    rc, out, seconds = killed_run(tiny_env, tmp_path, kill_in, kill_rank, kill_at)
    survivor = 1 - kill_rank
    print(f"\n{kill_in} on rank {kill_rank}: all ranks out {seconds:.1f}s after the kill")
    assert rc != 0
    assert seconds < 60, out[-3000:]  # DIST_TIMEOUT_SECONDS (300) never had to run out
    lines = [line for line in out.splitlines() if line.startswith(f"error: rank {survivor} failed during {phase}:")]
    assert lines, [l for l in out.splitlines() if "error" in l][:20]


def full_run(tiny_env, tmp_path, run_id, **env):
    rc, out = run_script(SCRIPT, dict(tiny_env, RUN_ID=run_id, **env), tmp_path, timeout=300)
    assert rc == 0, out[-3000:]
    return out


def test_eval_artifact_reruns_only_the_eval_with_the_same_lines(tiny_env, tmp_path):
    """EVAL_ARTIFACT: no training, no packing; the roundtrip and TTT scores of the run that wrote the artifact, to
    the last digit, in a log of its own; the artifact is read, never written."""
    first = full_run(tiny_env, tmp_path, "full")
    artifact = tmp_path / "logs" / "full_model.int6.ptz"
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    again = full_run(tiny_env, tmp_path, "again", EVAL_ARTIFACT="logs/full_model.int6.ptz")
    for name in ("final_int6_roundtrip_exact", "final_int6_ttt_exact"):
        assert final_metric(again, name) == final_metric(first, name), name
    assert "step:" not in again and "Serialized model" not in again and "eval_phase_time:" in again
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "logs" / "again_model.int6.ptz").exists()
    rc, out = run_script(SCRIPT, dict(tiny_env, RUN_ID="two", EVAL_ARTIFACT="logs/full_model.int6.ptz"), tmp_path,
                         nproc=2, timeout=300)  # any world size
    assert rc == 0 and final_metric(out, "final_int6_roundtrip_exact")[0] == pytest.approx(
        final_metric(first, "final_int6_roundtrip_exact")[0], rel=1e-9), out[-3000:]


def test_a_bad_artifact_is_refused_with_its_path_and_nothing_is_overwritten(tiny_env, tmp_path):
    full_run(tiny_env, tmp_path, "full")
    good = (tmp_path / "logs" / "full_model.int6.ptz").read_bytes()
    cases = {"truncated.ptz": good[:len(good) // 2], "flipped.ptz": good[:100] + bytes([good[100] ^ 1]) + good[101:]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        rc, out = run_script(SCRIPT, dict(tiny_env, RUN_ID="bad", EVAL_ARTIFACT=name), tmp_path, timeout=120)
        assert rc == 1 and f"error: {name}: artifact is corrupt" in out, out[-2000:]
        assert (tmp_path / name).read_bytes() == blob
    rc, out = run_script(SCRIPT, dict(tiny_env, RUN_ID="bad", EVAL_ARTIFACT="logs/full_model.int6.ptz",
                                      MODEL_DIM="128"), tmp_path, timeout=120)
    assert rc == 1 and "error: logs/full_model.int6.ptz: " in out and "read it with the PRESET and model settings that wrote it" in out
    rc, out = run_script(SCRIPT, dict(tiny_env, RUN_ID="bad", EVAL_ARTIFACT="missing.ptz"), tmp_path, timeout=120)
    assert rc == 1 and "error: missing.ptz: " in out and "No such file" in out


def test_logs_that_cannot_be_written_stop_the_run_before_training(tiny_env, tmp_path):
    (tmp_path / "logs").write_text("a file where the logs folder should be")
    t0 = time.perf_counter()
    rc, out = run_script(SCRIPT, tiny_env, tmp_path, timeout=120)
    assert rc == 1 and out.strip().startswith("error: cannot write the log logs/tiny.txt:"), out[-2000:]
    assert "step:" not in out and time.perf_counter() - t0 < 60


def test_sigterm_flushes_the_log_and_writes_a_last_line(tiny_env, tmp_path):
    env = dict(tiny_env, ITERATIONS="100000", TRAIN_LOG_EVERY="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "logs" / "tiny.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "step:3/" in log.read_text()):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    last = log.read_text().splitlines()[-1]
    assert last == "error: rank 0 failed during training: SystemExit: stopped by SIGTERM", out[-2000:]
