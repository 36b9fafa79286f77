"""The submitted artifact: in sync with the readable script, identical behaviour, the whole pipeline via run.sh,
and the README's settings table matching the script."""
import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import CORPUS, REPO, TOKENIZER_1024, final_metric, require_shared, run_script

import train_gpt_human as tg


def test_committed_artifact_in_sync_and_py310_clean():
    proc = subprocess.run([sys.executable, "compress.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def metric_lines(output):
    keep = ("step:", "final_", "quant:", "Serialized", "Total submission")
    return [l for l in output.splitlines() if l.startswith(keep) and "train_time" not in l and "eval_time" not in l] + [
        l.split(" train_time")[0] for l in output.splitlines() if l.startswith("step:")]


@pytest.mark.slow
def test_artifact_prints_the_same_losses_as_the_readable_script(tiny_env, tmp_path):
    env = dict(tiny_env, ITERATIONS="12", TRAIN_LOG_EVERY="3", TTT_ENABLED="0", GPTQ_CALIB_BATCHES="2")
    outputs = []
    for script in ("train_gpt_human.py", "train_gpt.py"):
        cwd = tmp_path / script
        cwd.mkdir()
        rc, out = run_script(REPO / script, env, cwd)
        assert rc == 0, out[-3000:]
        outputs.append(metric_lines(out))
    assert len(outputs[0]) > 8
    assert outputs[0] == outputs[1]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["seed", "record"])
def test_smoke_run_sh_runs_the_whole_pipeline(tmp_path, preset):
    require_shared()
    work = tmp_path / "repo"
    (work / "data").mkdir(parents=True)
    for name in ("run.sh", "train_gpt.py", "train_gpt_human.py", "requirements.txt"):
        shutil.copy(REPO / name, work / name)
    shutil.copy(REPO / "data" / "fineweb.py", work / "data" / "fineweb.py")
    env = dict(os.environ, SMOKE="1", SMOKE_DOCS=str(CORPUS), SMOKE_TOKENIZER=str(TOKENIZER_1024), SMOKE_MAX_DOCS="120",
               SMOKE_VAL_DOCS="20", ITERATIONS="12", VAL_MAX_TOKENS="8193", TTT_CHUNK_TOKENS="2048",
               GPTQ_CALIB_BATCHES="2", OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PRESET=preset)  # record: its default TTT (phased, 64 documents a batch, rank 80)
    proc = subprocess.run(["bash", "run.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    pre = final_metric(out, "final_prequant_exact")
    for name in ("final_int6_roundtrip_exact", "final_int6_ttt_exact"):
        loss, bpb = final_metric(out, name)
        assert abs(bpb - pre[1]) < 0.2 * pre[1], (name, bpb, pre)
    total = int(re.search(r"Total submission size int6\+\w+: (\d+) bytes", out).group(1))
    assert 0 < total <= 16_000_000
    assert ("batches_adapted:" if preset == "record" else "chunks_adapted:") in out


def readme_section(heading):
    """The README's text from `heading` (a line of its own) to the next heading of any level."""
    readme = (REPO / "README.md").read_text()
    start = readme.index(f"\n{heading}\n") + len(heading) + 2
    end = re.search(r"^#+ ", readme[start:], flags=re.M)
    return readme[start:start + end.start()] if end else readme[start:]


def test_readme_settings_table_matches_the_script():
    settings = readme_section("## Settings")
    cells = re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|([^|]*)\|", settings, flags=re.M)
    table = {name: (default, record.strip()) for name, default, record in cells}
    rows = {name: default for name, (default, _) in table.items()}
    record = {name: cell.strip("`") for name, (_, cell) in table.items() if cell}
    assert record == {k.upper(): str(v) for k, v in tg.PRESETS["record"].items()}
    fields = {f.name.upper(): f.default for f in dataclasses.fields(tg.Hyperparameters)}
    assert set(rows) == set(fields), (set(rows) ^ set(fields))
    for name, default in fields.items():
        shown = rows[name].strip()
        if shown.startswith("`"):
            assert shown.strip("`") == str(default), (name, shown, default)
        else:  # prose default ("auto", "empty", ...) only for empty-string or computed defaults
            assert default in ("", 0) or name in ("RUN_ID",), (name, shown, default)


def test_readme_fixed_choices_are_the_scripts_constants():
    """Every name in the first column of the README's table of fixed choices is a module constant of the
    script, and none is a setting any more."""
    table = readme_section("### Fixed choices (named constants beside their use)")
    first_cells = re.findall(r"^\| ([^|]+) \|", table, flags=re.M)
    names = [n for cell in first_cells for n in re.findall(r"`([A-Z0-9_]+)`", cell)]
    assert len(names) > 20
    settings = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    assert [n for n in names if not hasattr(tg, n) or n in settings] == []


def test_readme_2014_table_is_the_record_preset():
    """Every `NAME=value` in the "ours" column of README's #2014 table is what PRESET=record runs: the setting's value
    under the preset, or the module constant's."""
    presets = readme_section("## Presets")
    table = presets[presets.index("| setting | #2014 | ours |"):]
    rows = [line.strip().strip("|").split(" | ") for line in table.splitlines() if line.strip().startswith("|")][2:]
    hp = tg.Hyperparameters.from_env({"PRESET": "record"})
    pairs = [p for row in rows for p in re.findall(r"`([A-Z0-9_]+)=([^`]*)`", row[2])]
    assert len(pairs) > 40
    for name, shown in pairs:
        value = getattr(hp, name.lower()) if hasattr(hp, name.lower()) else getattr(tg, name)
        if isinstance(value, str):
            assert shown == value, name
        else:
            assert float(shown) == pytest.approx(float(value), rel=1e-12), name


def test_code_budget_and_readable_lines():
    """The artifact's bytes come out of the 16 MB: train_gpt.py <= 28,000 bytes.  The readable file: lines of at most
    110 characters and one name per assignment (`a, b = x, y` only in the payload, where compress.py packs runs)
    apart from unpacking a value (`x, y, seg = loader.next_batch(accum)`)."""
    assert (REPO / "train_gpt.py").stat().st_size <= 28_000
    source = (REPO / "train_gpt_human.py").read_text()
    assert [i for i, line in enumerate(source.splitlines(), 1) if len(line) > 110] == []
    packed = [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
              and isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple)]
    assert packed == []
