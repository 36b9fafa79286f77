"""Tests for tools/summarize_logs.py on synthetic logs in the spec's log format.

The synthetic logs come from ``write_log`` below; real logs from tiny runs can be
dropped in later (``test_real_logs_parse`` picks up repo logs/*.txt if present).
"""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "summarize_logs.py"
sys.path.insert(0, str(REPO / "tools"))

import summarize_logs as sl  # noqa: E402


# ---------------------------------------------------------------------------
# synthetic logs
# ---------------------------------------------------------------------------

def write_log(path, seed, *, prequant=(1.93, 1.145), pre_sliding=(1.91, 1.132),
              roundtrip=(1.94, 1.149), sliding=(1.92, 1.137), ttt=(1.88, 1.113),
              total_bytes=15_973_579, code_bytes=61_234, steps=6781, step_avg=87.01,
              train_ms=590_012, sliding_eval_ms=81_234, ttt_eval_ms=412_345,
              stop_early=True, code_dump=True):
    """Write a log in the spec format; pass None to drop a final line."""
    lines = []
    if code_dump:
        # the script's own source is sometimes dumped at the top of a log: must be ignored
        lines += [
            'log0(f"final_int6_ttt_exact val_loss:{q_loss:.8f} val_bpb:{q_bpb:.8f}")',
            '    log0(f"seed:{args.seed}")',
            "    # step:1/2 train_loss:9.9 train_time:1ms step_avg:1.00ms",
        ]
    lines += [
        f"seed:{seed}",
        "world_size:8 grad_accum_steps:1 device:cuda",
        "model_params:27123456",
        "step:0/20000 val_loss:6.9312 val_bpb:4.1049 train_time:0ms step_avg:0.01ms",
    ]
    for s in range(100, steps, 100):
        loss = 3.5 - s / steps
        lines.append(f"step:{s}/20000 train_loss:{loss:.4f} train_time:{s * 87}ms step_avg:87.00ms")
        if s % 2000 == 0:
            lines.append(f"step:{s}/20000 val_loss:{loss - 0.2:.4f} val_bpb:{(loss - 0.2) / 1.7:.4f} "
                         f"train_time:{s * 87}ms step_avg:87.00ms")
    lines.append(f"step:{steps}/20000 val_loss:{prequant[0]:.4f} val_bpb:{prequant[1]:.4f} "
                 f"train_time:{train_ms}ms step_avg:{step_avg:.2f}ms")
    if stop_early:
        lines.append(f"stopping_early: wallclock_cap train_time:{train_ms}ms step:{steps}/20000")
    lines.append("peak memory allocated: 21034 MiB reserved: 22050 MiB")
    if prequant:
        lines.append(f"final_prequant_exact val_loss:{prequant[0]:.8f} val_bpb:{prequant[1]:.8f}")
    if pre_sliding:
        lines.append(f"final_sliding_window_exact val_loss:{pre_sliding[0]:.8f} val_bpb:{pre_sliding[1]:.8f}")
    lines += [
        f"Serialized model int6+brotli: {total_bytes - code_bytes} bytes",
        f"Code size: {code_bytes} bytes",
        f"Total submission size int6+brotli: {total_bytes} bytes",
    ]
    if roundtrip:
        lines.append(f"final_int6_roundtrip_exact val_loss:{roundtrip[0]:.8f} val_bpb:{roundtrip[1]:.8f}")
    if sliding:
        lines.append(f"final_int6_sliding_window_exact val_loss:{sliding[0]:.8f} val_bpb:{sliding[1]:.8f} "
                     f"eval_time:{sliding_eval_ms}ms")
    if ttt:
        lines.append(f"final_int6_ttt_exact val_loss:{ttt[0]:.8f} val_bpb:{ttt[1]:.8f} "
                     f"eval_time:{ttt_eval_ms}ms chunks_adapted:1892/1893")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


SEEDS = (42, 1337, 2025)
TTT_LOSS = (1.8800, 1.8850, 1.8830)
TTT_BPB = (1.1130, 1.1160, 1.1150)
SLIDING_LOSS = (1.9200, 1.9230, 1.9210)
BYTES = (15_973_579, 15_980_001, 15_970_000)


@pytest.fixture
def three_logs(tmp_path):
    paths = []
    for i, seed in enumerate(SEEDS):
        paths.append(write_log(tmp_path / f"run_seed{seed}.txt", seed,
                               ttt=(TTT_LOSS[i], TTT_BPB[i]),
                               sliding=(SLIDING_LOSS[i], 1.137 + i / 1000),
                               total_bytes=BYTES[i], steps=6781 + i, train_ms=590_000 + i))
    return paths


# ---------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------

def test_parse_log_fields(tmp_path):
    p = write_log(tmp_path / "a.txt", 1337)
    r = sl.parse_log(p)
    assert r["seed"] == 1337
    assert r["world_size"] == 8 and r["grad_accum_steps"] == 1 and r["device"] == "cuda"
    assert r["model_params"] == 27123456
    assert r["steps"] == 6781 and r["iterations"] == 20000
    assert r["stopped_early"] == "wallclock_cap"
    assert r["step_avg_ms"] == pytest.approx(87.01)
    assert r["train_s"] == pytest.approx(590.012)
    assert r["eval_s"] == pytest.approx(81.234 + 412.345)
    assert r["peak_mem_mib"] == 21034
    assert r["bytes_total"] == 15_973_579 and r["bytes_code"] == 61_234
    assert r["bytes_model"] == 15_973_579 - 61_234
    f = r["finals"]
    assert f["prequant"] == {"val_loss": 1.93, "val_bpb": 1.145}
    assert f["prequant_sliding"]["val_loss"] == pytest.approx(1.91)
    assert f["roundtrip"]["val_bpb"] == pytest.approx(1.149) and f["roundtrip"]["quant"] == "int6"
    assert f["sliding"]["eval_time_ms"] == 81234
    assert f["ttt"]["chunks_adapted"] == 1892 and f["ttt"]["chunks_total"] == 1893
    assert r["quant"] == "int6"
    assert r["score_kind"] == "ttt"
    assert r["val_loss"] == pytest.approx(1.88) and r["val_bpb"] == pytest.approx(1.113)
    # step 0 plus every 2000 plus the last step have val; train loss every 100 steps
    assert [v[0] for v in r["val_curve"]] == [0, 2000, 4000, 6000, 6781]
    assert len(r["train_curve"]) == len(range(100, 6781, 100))
    assert r["train_curve"][0] == (100, pytest.approx(3.5 - 100 / 6781, abs=1e-4))


def test_parse_without_stopping_early_uses_last_step(tmp_path):
    r = sl.parse_log(write_log(tmp_path / "b.txt", 7, stop_early=False, steps=250, train_ms=21_750))
    assert r["steps"] == 250 and r["stopped_early"] is None
    assert r["train_s"] == pytest.approx(21.75)


@pytest.mark.parametrize("drop, expected", [
    ({}, "ttt"),
    ({"ttt": None}, "sliding"),
    ({"ttt": None, "sliding": None}, "roundtrip"),
    ({"ttt": None, "sliding": None, "roundtrip": None}, None),
])
def test_score_preference(tmp_path, drop, expected):
    r = sl.parse_log(write_log(tmp_path / "c.txt", 1, **drop))
    assert r["score_kind"] == expected
    if expected is None:
        assert r["val_loss"] is None and r["val_bpb"] is None
    else:
        assert r["val_loss"] == r["finals"][expected]["val_loss"]


def test_eval_seconds_without_ttt(tmp_path):
    r = sl.parse_log(write_log(tmp_path / "d.txt", 1, ttt=None, sliding_eval_ms=5_000))
    assert r["eval_s"] == pytest.approx(5.0)


# ---------------------------------------------------------------------------
# summary table, mean, std
# ---------------------------------------------------------------------------

def test_summarize_table_mean_std(three_logs):
    runs = [sl.parse_log(p) for p in three_logs]
    s = sl.summarize(runs)
    assert s["n_runs"] == 3 and s["score_kind"] == "ttt" and not s["warnings"]
    assert [row["seed"] for row in s["rows"]] == list(SEEDS)
    assert [row["ttt_loss"] for row in s["rows"]] == list(TTT_LOSS)
    assert [row["bytes_total"] for row in s["rows"]] == list(BYTES)
    assert [row["steps"] for row in s["rows"]] == [6781, 6782, 6783]
    st = s["stats"]
    # hand values: mean of (1.880, 1.885, 1.883) = 1.8826667; sample std
    m = (1.880 + 1.885 + 1.883) / 3
    sd = math.sqrt(((1.880 - m) ** 2 + (1.885 - m) ** 2 + (1.883 - m) ** 2) / 2)
    assert st["ttt_loss"]["mean"] == pytest.approx(m, abs=1e-12)
    assert st["ttt_loss"]["std"] == pytest.approx(sd, abs=1e-12)
    assert st["score_val_loss"]["mean"] == pytest.approx(m, abs=1e-12)
    assert st["score_val_bpb"]["std"] == pytest.approx(statistics.stdev(TTT_BPB), abs=1e-12)
    assert st["sliding_loss"]["mean"] == pytest.approx(statistics.mean(SLIDING_LOSS))
    assert st["train_s"]["mean"] == pytest.approx(590.001)
    assert s["bytes_total_max"] == max(BYTES)
    table = sl.format_table(s)
    assert "ttt_loss" in table and "1.88000" in table and "1337" in table
    assert table.count("\n") == 2 + 3 + 2 - 1  # header, rule, 3 rows, mean, std


def test_summarize_uses_best_common_stage(tmp_path):
    a = write_log(tmp_path / "a.txt", 1, ttt=(1.80, 1.10))
    b = write_log(tmp_path / "b.txt", 2, ttt=None, sliding=(1.90, 1.12))
    s = sl.summarize([sl.parse_log(a), sl.parse_log(b)])
    assert s["score_kind"] == "sliding"
    assert any("different best final lines" in w for w in s["warnings"])
    assert [row["score_val_loss"] for row in s["rows"]] == [1.92, 1.90]


def test_bytes_over_limit_warns(tmp_path):
    s = sl.summarize([sl.parse_log(write_log(tmp_path / "a.txt", 1, total_bytes=16_000_001))])
    assert any("exceeds" in w for w in s["warnings"])


# ---------------------------------------------------------------------------
# Student t and the significance test
# ---------------------------------------------------------------------------

def test_betainc_identities():
    for x in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert sl.betainc_reg(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert sl.betainc_reg(3, 1, x) == pytest.approx(x ** 3, abs=1e-14)
        assert sl.betainc_reg(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-14)
    for a in (0.5, 2.0, 7.3, 40.0):
        assert sl.betainc_reg(a, a, 0.5) == pytest.approx(0.5, abs=1e-13)
    # I_x(a,b) = 1 - I_{1-x}(b,a)
    assert sl.betainc_reg(2.5, 0.5, 0.3) == pytest.approx(1 - sl.betainc_reg(0.5, 2.5, 0.7), abs=1e-14)


def test_t_sf_closed_forms():
    for t in (-20.0, -3.0, -0.4, 0.0, 0.1, 1.0, 2.5, 12.0, 300.0):
        # df=1 is Cauchy
        assert sl.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-13)
        # df=2: P(T > t) = 1/2 - t / (2 sqrt(2 + t^2))
        assert sl.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
        # df=4: F(t) = 1/2 + 3/8 * u * (1 - t^2/(12 (1 + t^2/4))), u = t / sqrt(1 + t^2/4)
        q = 1 + t * t / 4
        f4 = 0.5 + 0.375 * (t / math.sqrt(q)) * (1 - t * t / (12 * q))
        assert sl.t_sf(t, 4) == pytest.approx(1 - f4, abs=1e-13)


@pytest.mark.parametrize("t, df, p", [
    (6.965, 2, 0.01),      # t table: t_{0.99, 2} = 6.965
    (3.747, 4, 0.01),
    (5.841, 3, 0.005),
    (2.228, 10, 0.025),
    (1.697, 30, 0.05),
    (2.920, 2, 0.05),
    (1.6449, 1e7, 0.05),   # ~normal
])
def test_t_sf_table_values(t, df, p):
    assert sl.t_sf(t, df) == pytest.approx(p, abs=1e-4)
    assert sl.t_sf(-t, df) == pytest.approx(1 - p, abs=1e-4)


def _t_pdf(x, df):
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


def _sf_by_simpson(t, df, n=20000):
    """P(0 < T < |t|) by Simpson's rule, then the tail from symmetry."""
    a, b = 0.0, abs(t)
    h = (b - a) / n
    s = _t_pdf(a, df) + _t_pdf(b, df)
    s += 4 * sum(_t_pdf(a + (2 * k - 1) * h, df) for k in range(1, n // 2 + 1))
    s += 2 * sum(_t_pdf(a + 2 * k * h, df) for k in range(1, n // 2))
    mid = s * h / 3
    return 0.5 - mid if t >= 0 else 0.5 + mid


@pytest.mark.parametrize("t, df", [(1.3, 3.7), (2.9, 2.41), (-0.8, 5.5), (4.2, 7.93), (0.05, 1.5)])
def test_t_sf_fractional_df_matches_integration(t, df):
    assert sl.t_sf(t, df) == pytest.approx(_sf_by_simpson(t, df), abs=1e-8)


def test_one_sample_against_constant_baseline_hand_computed():
    # losses 1.880, 1.885, 1.890: mean 1.885, sample std 0.005, se = 0.005/sqrt(3)
    losses = [1.880, 1.885, 1.890]
    se = 0.005 / math.sqrt(3)
    baseline = 1.885 + 0.005 + 6.965 * se   # chosen so that t = 6.965 exactly
    t, df, p = sl.welch_one_sided(losses, [baseline], 0.005)
    assert df == pytest.approx(2.0)
    assert t == pytest.approx(6.965, abs=1e-9)
    assert p == pytest.approx(0.01, abs=2e-5)          # t table value
    assert p == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    # a constant baseline given several times is the same test
    t2, df2, p2 = sl.welch_one_sided(losses, [baseline] * 4, 0.005)
    assert (t2, df2) == pytest.approx((t, df)) and p2 == pytest.approx(p)
    # worse than the baseline -> p > 0.5
    assert sl.welch_one_sided([2.0, 2.01, 2.02], [1.9], 0.005)[2] > 0.5


def test_welch_two_sample_hand_computed():
    a = [1.880, 1.890, 1.885]          # candidate
    b = [1.910, 1.930, 1.920, 1.925]   # baseline
    ma, mb = sum(a) / 3, sum(b) / 4
    va = sum((x - ma) ** 2 for x in a) / 2 / 3
    vb = sum((x - mb) ** 2 for x in b) / 3 / 4
    t_hand = (mb - 0.005 - ma) / math.sqrt(va + vb)
    df_hand = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    t, df, p = sl.welch_one_sided(a, b, 0.005)
    assert t == pytest.approx(t_hand, rel=1e-12)
    assert df == pytest.approx(df_hand, rel=1e-12)
    assert p == pytest.approx(_sf_by_simpson(t_hand, df_hand), abs=1e-8)


def test_welch_equal_variances_gives_df_2n_minus_2():
    a = [1.0, 1.1, 1.2]
    b = [1.3, 1.4, 1.5]
    t, df, p = sl.welch_one_sided(a, b, 0.0)
    assert df == pytest.approx(4.0)
    assert t == pytest.approx(0.3 / math.sqrt(2 * 0.01 / 3))
    q = 1 + t * t / 4
    assert p == pytest.approx(1 - (0.5 + 0.375 * (t / math.sqrt(q)) * (1 - t * t / (12 * q))), abs=1e-12)


def test_welch_degenerate_cases():
    assert all(math.isnan(v) for v in sl.welch_one_sided([1.0], [2.0], 0.0))
    t, _, p = sl.welch_one_sided([1.0, 1.0], [2.0], 0.005)
    assert t == math.inf and p == 0.0
    t, _, p = sl.welch_one_sided([3.0, 3.0], [2.0], 0.005)
    assert t == -math.inf and p == 1.0


def test_against_scipy_if_available():
    stats = pytest.importorskip("scipy.stats")
    a, b = [1.90, 1.93, 1.91], [1.95, 1.97, 1.94, 1.96]
    t, df, p = sl.welch_one_sided(a, b, 0.005)
    ref = stats.ttest_ind(a, [x - 0.005 for x in b], equal_var=False, alternative="less")
    assert -t == pytest.approx(float(ref.statistic)) and p == pytest.approx(float(ref.pvalue), abs=1e-12)
    for tt, dd in ((0.3, 2.2), (5.0, 3.0), (-1.7, 40.0), (2.5, 118.6)):
        assert sl.t_sf(tt, dd) == pytest.approx(float(stats.t.sf(tt, dd)), abs=1e-12)


def test_summarize_significance_modes(three_logs, tmp_path):
    runs = [sl.parse_log(p) for p in three_logs]
    s = sl.summarize(runs, baseline_loss=1.95)
    sig = s["significance"]
    assert sig["mode"] == "one_sample_constant_baseline"
    exp = sl.welch_one_sided(TTT_LOSS, [1.95], 0.005)
    assert (sig["t"], sig["df"], sig["p"]) == pytest.approx(exp)
    assert sig["significant"] is (exp[2] < 0.01)
    assert sig["improvement"] == pytest.approx(1.95 - statistics.mean(TTT_LOSS))
    # too small an improvement: not significant
    s2 = sl.summarize(runs, baseline_loss=1.888)
    assert s2["significance"]["significant"] is False
    s3 = sl.summarize(runs, baseline_losses=[1.95, 1.96, 1.955])
    assert s3["significance"]["mode"] == "welch_two_sample"
    assert s3["significance"]["p"] == pytest.approx(
        sl.welch_one_sided(TTT_LOSS, [1.95, 1.96, 1.955], 0.005)[2])


# ---------------------------------------------------------------------------
# CLI: report, submission.json, plot
# ---------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


def test_cli_report_json_and_plot(three_logs, tmp_path):
    out_json = tmp_path / "submission.json"
    out_png = tmp_path / "curves.png"
    r = run_cli(*three_logs, "--baseline-loss", "1.95", "--json", out_json, "--plot", out_png,
                "--name", "My Run", "--author", "A. Person", "--github-id", "aperson",
                "--blurb", "test blurb", "--date", "2025-01-02")
    assert r.returncode == 0, r.stderr
    assert "score (ttt)" in r.stdout and "SIGNIFICANT" in r.stdout
    sub = json.loads(out_json.read_text())
    assert sub["name"] == "My Run" and sub["author"] == "A. Person" and sub["github_id"] == "aperson"
    assert sub["blurb"] == "test blurb" and sub["date"] == "2025-01-02"
    assert sub["val_bpb"] == pytest.approx(statistics.mean(TTT_BPB))
    assert sub["val_loss"] == pytest.approx(statistics.mean(TTT_LOSS))
    assert sub["val_loss_std"] == pytest.approx(statistics.stdev(TTT_LOSS))
    assert sub["bytes_total"] == max(BYTES)
    assert sub["bytes_code"] == 61_234
    assert sub["score_stage"] == "ttt"
    assert sub["seeds"] == list(SEEDS)
    assert [e["val_loss"] for e in sub["per_seed"]] == list(TTT_LOSS)
    assert [e["val_bpb"] for e in sub["per_seed"]] == list(TTT_BPB)
    assert sub["significance"]["significant"] is True
    data = out_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_cli_baseline_logs(three_logs, tmp_path):
    base = [write_log(tmp_path / f"base{i}.txt", i, ttt=(1.95 + i / 100, 1.15)) for i in range(3)]
    r = run_cli(*three_logs, "--baseline-logs", *base)
    assert r.returncode == 0, r.stderr
    assert "welch_two_sample" in r.stdout


def test_cli_default_date_and_missing_file(three_logs, tmp_path):
    out_json = tmp_path / "s.json"
    r = run_cli(three_logs[0], "--json", out_json)
    assert r.returncode == 0, r.stderr
    sub = json.loads(out_json.read_text())
    assert len(sub["date"]) == 10 and sub["date"][4] == "-"
    assert sub["val_loss_std"] is None  # one run has no sample std
    r = run_cli(tmp_path / "nope.txt")
    assert r.returncode == 2 and "no such log file" in r.stderr


def test_top_level_submission_json_is_placeholder():
    sub = json.loads((REPO / "submission.json").read_text())
    if sub.get("val_bpb") is None:  # no score claimed -> must say why
        assert "no 8xH100" in sub["status"]
    else:  # a real score must come with per-seed values
        assert len(sub["per_seed"]) >= 3


def test_real_logs_parse():
    """Real logs under the repo's logs/ (e.g. tiny CPU runs) must parse; skipped when there are none."""
    logs = [p for p in sorted((REPO / "logs").rglob("*.txt"))
            if not p.name.endswith(".stdout.txt") and "\nfinal_" in p.read_text(errors="replace")]
    if not logs:
        pytest.skip("no run logs with final lines under logs/")
    runs = [sl.parse_log(p) for p in logs]
    for p, r in zip(logs, runs):
        assert r["seed"] is not None, p
        assert r["steps"] and r["train_s"] is not None, p
        assert r["finals"].get("prequant"), p
        if r["score_kind"]:
            assert r["bytes_total"], p
    s = sl.summarize(runs, baseline_loss=100.0)
    assert s["n_runs"] == len(runs)


def test_training_done_and_eval_phase_lines(tmp_path):
    p = write_log(tmp_path / "e.txt", 3, stop_early=False, steps=300, train_ms=30_000)
    with open(p, "a") as fh:
        fh.write("eval_phase_time:13.9s\n")
    text = p.read_text().replace("peak memory", "training_done steps:300 train_time:30123ms\npeak memory")
    p.write_text(text)
    r = sl.parse_log(p)
    assert r["steps"] == 300 and r["train_s"] == pytest.approx(30.123)
    assert r["eval_s"] == pytest.approx(13.9)


# ---------------------------------------------------------------------------
# log fields of the current trainer, finished / failed seeds
# ---------------------------------------------------------------------------

# A trainer "script" whose defaults the records tool reads (ttt_mode chunk, PRESETS.record: vocab 8192)
FAKE_TRAINER = '''import dataclasses
@dataclasses.dataclass
class Hyperparameters:
    preset: str = "seed"
    vocab_size: int = 1024
    run_id: str = ""
    seed: int = 1337
    val_max_tokens: int = 0
    ttt_enabled: int = 1
    ttt_mode: str = "chunk"
    ttt_lr: float = 0.02
    eval_budget_seconds: float = 570.0
PRESETS = {"seed": {}, "record": dict(vocab_size=8192, ttt_mode="phased")}
'''
BASE_CONFIG = {"preset": "seed", "vocab_size": "1024", "run_id": "x", "seed": "0", "val_max_tokens": "0",
               "ttt_enabled": "1", "ttt_mode": "phased", "ttt_lr": "0.02", "eval_budget_seconds": "570.0"}
FULL_SP1024 = 62_021_846


def write_record_log(path, seed, *, code_sha, config=None, val_tokens=FULL_SP1024, hessians_ms=596_000,
                     eval_phase_s=530.0, **kw):
    """write_log plus the current trainer's lines: code_sha256, config, val_tokens, gptq:hessians,
    eval_phase_time (None drops one)."""
    cfg = dict(BASE_CONFIG, run_id=Path(path).stem, seed=str(seed), **(config or {}))
    write_log(path, seed, code_dump=False, **kw)
    head = [f"code_sha256:{code_sha} python:3.12.3 torch:2.9.1+cu128 brotli:True"] if code_sha else []
    head.append("config: " + " ".join(f"{k}={v}" for k, v in cfg.items()))
    if val_tokens is not None:
        head.append(f"val_tokens:{val_tokens} val_docs:50000 train_shards:80 bytes:tokenizer")
    text = Path(path).read_text().replace(f"seed:{seed}\n", f"seed:{seed}\n" + "\n".join(head) + "\n", 1)
    if hessians_ms is not None:
        gptq = (f"gptq:hessians batches:64 time:6000ms reserve:12000ms train+hessians:{hessians_ms}ms "
                "cap:600000ms within_cap:True")
        text = text.replace("peak memory", gptq + "\npeak memory")
    if eval_phase_s is not None:
        text += f"eval_phase_time:{eval_phase_s}s (timed: sliding and TTT)\n"
    Path(path).write_text(text)
    return Path(path)


def test_parse_current_trainer_lines(tmp_path):
    p = write_record_log(tmp_path / "a.txt", 42, code_sha="0123456789abcdef", config={"ve_layers": ""},
                         hessians_ms=598_123)
    r = sl.parse_log(p)
    assert r["code_sha256"] == "0123456789abcdef" and r["python"] == "3.12.3" and r["torch"] == "2.9.1+cu128"
    assert r["config"]["ttt_mode"] == "phased" and r["config"]["seed"] == "42"
    assert r["config"]["ve_layers"] == ""
    assert r["val_tokens"] == FULL_SP1024
    assert r["train_hessians_ms"] == 598_123
    assert r["eval_phase_s"] == 530.0 and r["eval_s"] == 530.0
    assert r["expected_stage"] == "ttt" and r["problem"] is None


def test_parse_config_value_with_spaces():
    assert sl.parse_config("a=1 b=x y c= d=2") == {"a": "1", "b": "x y", "c": "", "d": "2"}


def test_eval_seconds_fallback_counts_only_timed_lines(tmp_path):
    p = write_log(tmp_path / "a.txt", 1, sliding_eval_ms=5_000, ttt_eval_ms=7_000)
    roundtrip = "final_int6_roundtrip_exact val_loss:1.94000000 val_bpb:1.14900000"
    p.write_text(p.read_text().replace(roundtrip, roundtrip + " eval_time:9000ms"))
    r = sl.parse_log(p)
    assert r["finals"]["roundtrip"]["eval_time_ms"] == 9000
    assert r["eval_s"] == pytest.approx(12.0)  # sliding + TTT; the roundtrip diagnostic is not timed


@pytest.mark.parametrize("config, drop, problem", [
    ({}, {"ttt": None}, "no final_int6_ttt_exact line"),
    ({"ttt_enabled": "0"}, {"ttt": None}, None),
    ({"ttt_enabled": "0"}, {"ttt": None, "sliding": None}, "no final_int6_sliding_window_exact line"),
    ({}, {"ttt": None, "sliding": None, "roundtrip": None}, "no final_*_exact score line"),
])
def test_incomplete_run_named(tmp_path, config, drop, problem):
    r = sl.parse_log(write_record_log(tmp_path / "a.txt", 1, code_sha="ab", config=config, **drop))
    assert (r["problem"] is None) if problem is None else (problem in r["problem"])


def test_log_with_two_runs_is_not_finished(tmp_path):
    p = write_record_log(tmp_path / "a.txt", 1, code_sha="ab")
    p.write_text(p.read_text() * 2)
    assert "holds 2 runs" in sl.parse_log(p)["problem"]


def test_failed_and_incomplete_seeds_are_marked_not_averaged(three_logs, tmp_path):
    crashed = write_log(tmp_path / "crash.txt", 7)
    crashed.write_text(crashed.read_text().split("peak memory")[0])  # died after training
    runs = [sl.parse_log(p) for p in [three_logs[0], crashed, three_logs[1]]]
    s = sl.summarize(runs, baseline_loss=1.95, failed_seeds=[1337, 99])
    assert [row["status"] for row in s["rows"]] == ["ok", "incomplete", "failed"]
    assert s["n_finished"] == 1 and s["missing_seeds"] == [99]
    assert s["stats"]["score_val_loss"]["n"] == 1
    assert s["stats"]["score_val_loss"]["mean"] == pytest.approx(TTT_LOSS[0])
    assert s["significance"]["n"] == 1
    report = sl.format_report(s)
    assert "INCOMPLETE: seed 7 (crash.txt): no final_*_exact score line" in report
    assert "FAILED: seed 1337 (run_seed1337.txt): the deploy script reported this seed as failed" in report
    assert "FAILED: seed 99: no log came back" in report
    assert "finished: 1 of 4 seeds" in report
    assert "incomplete |" in sl.format_table(s)
    sub = sl.build_submission(s, "n", "a", "g", "b", "2025-01-01")
    assert sub["seeds"] == [42] and [e["seed"] for e in sub["per_seed"]] == [42]
    assert [(e["seed"], e["status"]) for e in sub["not_finished"]] == [(7, "incomplete"), (1337, "failed"),
                                                                       (99, "failed")]


# ---------------------------------------------------------------------------
# records folder (tools/record_folder.py through the CLI)
# ---------------------------------------------------------------------------

import record_folder as rf  # noqa: E402

HESSIANS_MS = (596_000, 597_500, 595_250)
EVAL_S = (530.0, 541.2, 529.9)


def make_record_set(tmp_path, **per_seed):
    """The shipped script and three clean seed logs; per_seed={kwarg: (v42, v1337, v2025)} overrides."""
    code = tmp_path / "train_gpt.py"
    code.write_text(FAKE_TRAINER)
    sha = rf.code_sha256(code)
    logs = []
    for i, seed in enumerate(per_seed.pop("seed", SEEDS)):
        kw = dict(code_sha=sha, ttt=(TTT_LOSS[i], TTT_BPB[i]), total_bytes=BYTES[i], steps=6781 + i,
                  train_ms=590_000 + i, hessians_ms=HESSIANS_MS[i], eval_phase_s=EVAL_S[i])
        kw.update({k: v[i] for k, v in per_seed.items()})
        logs.append(write_record_log(tmp_path / f"run_{i}.txt", seed, **kw))
    return code, logs


def run_record(code, logs, out, *extra):
    return run_cli(*logs, "--records-dir", out, "--code", code, "--date", "2025-01-02",
                   "--name", "Test Record", "--blurb", "What changed: phased TTT.", *extra)


def check_lines(stdout):
    """{check name: its line} of the tool's output."""
    return {line.split(":")[0][len("check "):]: line
            for line in stdout.splitlines() if line.startswith("check ")}


def test_records_folder_from_clean_logs(tmp_path):
    code, logs = make_record_set(tmp_path)
    out = tmp_path / "records" / "2025-01-02_test"
    r = run_record(code, logs, out, "--baseline-loss", "1.95")
    assert r.returncode == 0, r.stdout + r.stderr
    checks = check_lines(r.stdout)
    assert list(checks) == list(rf.CHECK_NAMES) and all(": PASS: " in v for v in checks.values()), checks
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "run_0.txt", "run_1.txt", "run_2.txt",
                                                      "submission.json", "train_gpt.py"]
    assert (out / "train_gpt.py").read_bytes() == code.read_bytes()
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in logs)
    readme = (out / "README.md").read_text()
    assert readme.startswith("# Test Record\n\n2025-01-02. What changed: phased TTT.\n")
    m, sd = statistics.mean(TTT_BPB), statistics.stdev(TTT_BPB)
    assert f"**val_bpb {m:.5f} ± {sd:.5f}**" in readme
    # seed, steps, ms/step, train ms, train+Hessians ms, pre-quant, roundtrip, final, eval s, bytes
    rows = [line for line in readme.splitlines() if line.startswith("| 42 |") or line.startswith("| 1337 |")]
    assert rows == ["| 42 | 6,781 | 87.01 | 590,000 | 596,000 | 1.14500 | 1.14900 | 1.11300 | 530.0 | "
                    "15,973,579 |",
                    "| 1337 | 6,782 | 87.01 | 590,001 | 597,500 | 1.14500 | 1.14900 | 1.11600 | 541.2 | "
                    "15,980,001 |"]
    assert (f"| mean | 6,782 | 87.01 | 590,001 | 596,250 | 1.14500 | 1.14900 | {m:.5f} | "
            f"{statistics.mean(EVAL_S):.1f} | {statistics.mean(BYTES):,.0f} |") in readme
    assert "Significance: [one_sample_constant_baseline]" in readme and "-> SIGNIFICANT" in readme
    assert "Hardware: 8xH100 80GB SXM (given by --hardware; the logs do not name the GPU); from the logs: " \
           "world_size 8, device cuda; torch 2.9.1+cu128, python 3.12.3." in readme
    assert "| `TTT_MODE` | `phased` | `chunk` |" in readme
    assert [line for line in readme.splitlines() if line.startswith("| `")] == [
        "| `TTT_MODE` | `phased` | `chunk` |"]  # the only setting off its default
    assert "SEED=<seed> TTT_MODE=phased torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme
    assert readme.count("- [x] ") == len(rf.CHECKS) and "- [ ]" not in readme
    sub = json.loads((out / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(m) and sub["val_bpb_std"] == pytest.approx(sd)
    assert sub["seeds"] == list(SEEDS) and sub["bytes_total"] == max(BYTES) and sub["date"] == "2025-01-02"
    assert set(sub["checklist"].values()) == {"pass"} and sub["significance"]["significant"] is True
    # deterministic: a second build is byte for byte the same
    out2 = tmp_path / "again"
    assert run_record(code, logs, out2, "--baseline-loss", "1.95").returncode == 0
    assert all((out / n).read_bytes() == (out2 / n).read_bytes() for n in ("README.md", "submission.json"))


@pytest.mark.parametrize("item, overrides, baseline, message", [
    ("code_hash", {"code_sha": (None, "ffffffffffffffff", None)}, "1.95",
     "seed 1337 (run_1.txt) ran code ffffffffffffffff"),
    ("artifact_bytes", {"total_bytes": (15_973_579, 16_000_001, 15_970_000)}, "1.95",
     "seed 1337 (run_1.txt): 16,000,001 bytes > 16,000,000"),
    ("eval_time", {"eval_phase_s": (530.0, 541.2, 600.5)}, "1.95",
     "seed 2025 (run_2.txt): timed eval 600.5 s > 600 s"),
    ("eval_time", {"eval_phase_s": (530.0, None, 529.9)}, "1.95",
     "seed 1337 (run_1.txt) has no eval_phase_time: line"),
    ("train_time", {"hessians_ms": (600_100, 597_500, 595_250)}, "1.95",
     "seed 42 (run_0.txt): training + Hessians 600.1 s > 600 s"),
    ("val_tokens", {"val_tokens": (62_000_000,) * 3}, "1.95",
     "62,000,000 tokens, not the 62,021,846 of the full sp1024 set"),
    ("val_tokens", {"val_tokens": (FULL_SP1024, FULL_SP1024 - 1, FULL_SP1024)}, "1.95",
     "different token counts: 62,021,846 on seed 42 (run_0.txt), seed 2025 (run_2.txt); "
     "62,021,845 on seed 1337"),
    ("val_tokens", {"config": ({"val_max_tokens": "1000"},) * 3, "val_tokens": (1000,) * 3}, "1.95",
     "seed 42 (run_0.txt), seed 1337 (run_1.txt), seed 2025 (run_2.txt) scored a prefix: "
     "val_max_tokens=1000"),
    ("seeds", {"seed": (42, 42, 2025)}, "1.95", "repeated seed 42 in run_0.txt, run_1.txt"),
    ("same_config", {"config": ({}, {"ttt_lr": "0.03"}, {})}, "1.95",
     "seed 1337 (run_1.txt) differs from seed 42 (run_0.txt): ttt_lr=0.03 vs 0.02"),
    ("finished", {"ttt": ((1.88, 1.113), None, (1.883, 1.115))}, "1.95",
     "seed 1337 (run_1.txt): incomplete: no final_int6_ttt_exact line"),
    ("significance", {}, "1.888", "-> not significant"),
    ("significance", {}, None, "no baseline given: pass --baseline-loss X or --baseline-logs LOGS"),
])
def test_records_checklist_catches(tmp_path, item, overrides, baseline, message):
    code, logs = make_record_set(tmp_path, **overrides)
    out = tmp_path / "rec"
    r = run_record(code, logs, out, *(("--baseline-loss", baseline) if baseline else ()))
    assert r.returncode == 1, r.stdout + r.stderr
    checks = check_lines(r.stdout)
    failed = [name for name, line in checks.items() if ": FAIL: " in line]
    assert failed == [item], checks
    assert message in checks[item]
    assert (f"records folder not written: 1 check(s) failed: {item} "
            f"(fix them, or pass --allow {item}") in r.stdout
    assert not out.exists()


def test_records_allow_writes_and_says_so(tmp_path):
    code, logs = make_record_set(tmp_path, total_bytes=(15_973_579, 16_000_001, 15_970_000))
    out = tmp_path / "rec"
    r = run_record(code, logs, out, "--baseline-loss", "1.95", "--allow", "artifact_bytes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check artifact_bytes: ALLOWED: seed 1337 (run_1.txt): 16,000,001 bytes" in r.stdout
    readme = (out / "README.md").read_text()
    assert "- [ ] **FAILED, allowed by `--allow artifact_bytes`**" in readme and readme.count("- [x] ") == 8
    sub = json.loads((out / "submission.json").read_text())
    assert sub["checklist"]["artifact_bytes"].startswith("FAILED (allowed): seed 1337")


def test_records_val_tokens_known_only_by_flag(tmp_path):
    config = ({"vocab_size": "8192", "preset": "record", "ttt_mode": "phased"},) * 3
    code, logs = make_record_set(tmp_path, config=config, val_tokens=(47_000_000,) * 3)
    r = run_record(code, logs, tmp_path / "a", "--baseline-loss", "1.95")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "only the equality across seeds was checked: no full count is known for vocab_size 8192" \
        in r.stdout
    readme = (tmp_path / "a" / "README.md").read_text()
    # vocab 8192 and phased TTT are the record preset's own: only PRESET itself differs
    settings = [line for line in readme.splitlines() if line.startswith("| `")]
    assert settings == ["| `PRESET` | `record` | `seed` |"]
    assert "SEED=<seed> PRESET=record torchrun" in readme
    r = run_record(code, logs, tmp_path / "b", "--baseline-loss", "1.95", "--val-tokens", "47000001")
    assert r.returncode == 1 and "47,000,000 tokens, not the 47,000,001 of --val-tokens" in r.stdout


def test_records_bad_input_named(tmp_path):
    code, logs = make_record_set(tmp_path)
    r = run_cli(*logs, "--allow", "seeds")
    assert r.returncode == 2 and "--allow works only with --records-dir DIR" in r.stderr
    r = run_record(code, logs, tmp_path / "x", "--allow", "seeds,nope")
    assert r.returncode == 2 and "--allow: unknown check nope; the checks are finished, code_hash" in r.stderr
    r = run_record(tmp_path / "missing.py", logs, tmp_path / "x")
    assert r.returncode == 2 and "--code" in r.stderr and "missing.py: no such file" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    r = run_record(code, logs, tmp_path / "full")
    assert r.returncode == 2 and "already exists and is not empty" in r.stderr
    (tmp_path / "sub").mkdir()
    twin = write_record_log(tmp_path / "sub" / "run_0.txt", 7, code_sha=rf.code_sha256(code))
    r = run_record(code, [*logs, twin], tmp_path / "y", "--baseline-loss", "1.95")
    assert r.returncode == 2 and "logs named run_0.txt would collide" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_script_defaults_from_the_shipped_artifact():
    defaults, presets = rf.script_defaults(REPO / "train_gpt.py")
    assert defaults["num_layers"] == 11 and defaults["target_bytes"] == 16_000_000
    assert defaults["preset"] == "seed"
    assert presets["record"]["vocab_size"] == 8192 and presets["seed"] == {}


@pytest.mark.parametrize("codec", ["b85", "latin1"])
def test_script_defaults_through_a_stub(tmp_path, codec):
    import base64
    import lzma
    blob = lzma.compress(FAKE_TRAINER.encode(), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    tail = ',lzma.FORMAT_RAW,None,[{"id":lzma.FILTER_LZMA2}]).decode())\n'
    if codec == "b85":
        text = ('import lzma,base64\nexec(lzma.decompress(base64.b85decode("'
                + base64.b85encode(blob).decode() + '")')
    else:
        lit = blob.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lit = lit.replace("\r", "\\r").replace("\0", "\\x00")
        text = '#coding:l1\nimport lzma\nexec(lzma.decompress("' + lit + '".encode("l1")'
    path = tmp_path / "art.py"
    path.write_bytes((text + tail).encode("latin-1"))
    defaults, presets = rf.script_defaults(path)
    assert defaults["ttt_mode"] == "chunk" and defaults["eval_budget_seconds"] == 570.0
    assert presets == {"seed": {}, "record": {"vocab_size": 8192, "ttt_mode": "phased"}}


def test_records_dry_run_on_the_repo_cpu_logs(tmp_path):
    """The repo's own tiny CPU logs: complete and consistent, but a prefix of the validation set."""
    logs = sorted((REPO / "logs" / "cpu_tiny").glob("tiny_seed*.txt"))
    if len(logs) != 3:
        pytest.skip("logs/cpu_tiny has no three seed logs")
    out = tmp_path / "dry"
    r = run_cli(*logs, "--records-dir", out, "--date", "2025-01-02",
                "--allow", "code_hash,val_tokens,significance")
    assert r.returncode == 0, r.stdout + r.stderr
    checks = check_lines(r.stdout)
    for name in ("finished", "same_config", "train_time", "eval_time", "artifact_bytes", "seeds"):
        assert ": PASS: " in checks[name], checks[name]
    assert "scored a prefix: val_max_tokens=32769" in checks["val_tokens"]
    assert ": ALLOWED: no baseline given" in checks["significance"]
    assert "Hardware: CPU; from the logs: world_size 1, device cpu" in (out / "README.md").read_text()
