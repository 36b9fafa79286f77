"""Tests for compress.py (builds the size-counted train_gpt.py artifact)."""
import ast
import glob
import io
import os
import shutil
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import compress  # noqa: E402

COMPRESS = str(REPO / "compress.py")

SAMPLE = textwrap.dedent('''\
    #!/usr/bin/env python3
    """MODULE_DOC_MARKER: a module docstring."""
    from __future__ import annotations
    import os
    import sys
    import inspect
    from dataclasses import dataclass, field


    @dataclass
    class Hyper:
        """CLASS_DOC_MARKER"""
        lr: float = float(os.environ.get("LR", "0.5"))  # COMMENT_MARKER_1
        steps: int = 3
        tags: list = field(default_factory=list)
        name: str = "run"


    class Plain:
        """only a docstring"""


    class Counter:
        total: int
        start: int = 10

        def __init__(self) -> None:
            self.value: int = self.start


    def scale(x: float, k: float = 2.0, *args: int, key: str = "a", **kw: str) -> float:
        """FUNC_DOC_MARKER"""
        # COMMENT_MARKER_2
        "a bare string statement"
        y: float
        z: float = x * k
        return z


    def fmt(d: dict) -> str:
        return f"{d['a']}|{d['b']!r:>6}|" f'{len(d):{"0"}3d}'  # COMMENT_MARKER_3


    def only_doc():
        """ONLY_DOC_MARKER"""


    def main() -> None:
        h = Hyper()
        who = sys.argv[1] if len(sys.argv) > 1 else "nobody"
        print("who", who, "env", os.environ.get("PG_TEST_VAR", "-"))
        print("hyper", h, scale(h.lr), fmt({"a": who, "b": 7}))
        print("plain", Plain.__name__, only_doc(), Counter().value)
        print("name", __name__)
        print("src", inspect.getsource(scale).splitlines()[0])


    if __name__ == "__main__":
        main()
''')


def _no_docstrings(tree: ast.AST) -> ast.AST:
    """Independent reference: drop docstrings only."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _run(args, cwd=None, env=None, python=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([python or sys.executable, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


def _other_python(minor):
    cands = [shutil.which(f"python3.{minor}")]
    cands += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python")))
    for c in cands:
        if not c:
            continue
        try:
            out = subprocess.run([c, "-c", "import sys;print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == f"(3, {minor})":
            return c
    return None


@pytest.fixture(scope="module")
def stripped():
    return compress.strip_source(SAMPLE)


@pytest.fixture(scope="module")
def artifact():
    return compress.build_artifact(SAMPLE)


def test_comments_and_docstrings_gone(stripped):
    for marker in ("MODULE_DOC_MARKER", "CLASS_DOC_MARKER", "FUNC_DOC_MARKER", "ONLY_DOC_MARKER",
                   "COMMENT_MARKER", "a bare string statement", "only a docstring"):
        assert marker not in stripped
    toks = list(tokenize.generate_tokens(io.StringIO(stripped).readline))
    assert not [t for t in toks if t.type == tokenize.COMMENT]
    assert "\n\n" not in stripped
    assert len(stripped) < len(SAMPLE)


def test_stripped_ast_equal_to_original_minus_docstrings():
    src = textwrap.dedent('''\
        """doc"""
        import math  # c
        class A:
            """doc"""
            def f(self, x):
                """doc"""
                # c
                msg = (f"{x!r:>{4}}"  # c
                       f'{x:{"0"}3}'
                       "tail")
                block = f"""first {x}
            second line, indented {'x'}
        """
                return math.sqrt(x) + len(msg) + len(block)
        def g():
            """doc"""
        print(A().f(4.0), g())
    ''')
    out = compress.strip_source(src)
    assert ast.dump(ast.parse(out)) == ast.dump(_no_docstrings(ast.parse(src)))


def test_stripped_ast_equal_to_strip_tree(stripped):
    assert ast.dump(ast.parse(stripped)) == ast.dump(compress._strip_tree(SAMPLE))


def test_annotations(stripped):
    tree = ast.parse(stripped)
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    a = funcs["scale"].args
    assert all(x.annotation is None for x in [*a.args, *a.kwonlyargs, a.vararg, a.kwarg])
    assert funcs["scale"].returns is None and funcs["main"].returns is None
    # dataclass fields keep their annotations
    assert "lr: float = float(" in stripped and "tags: list = field(" in stripped
    # plain class (no decorator / base): bare annotation dropped, valued one -> assignment
    assert "total" not in stripped and "start = 10" in stripped
    assert "self.value = self.start" in stripped
    # function-local annotations
    assert "y:" not in stripped and "z = x * k" in stripped


def test_unknown_decorator_keeps_annotations():
    src = textwrap.dedent('''\
        import functools
        def jit(fn):
            return fn
        @jit
        def kernel(x_ptr, BLOCK: "constexpr", n: int = 4) -> None:
            pass
        @staticmethod
        def plain(a: int) -> int:
            return a
        @functools.lru_cache(maxsize=None)
        def cached(a: int) -> int:
            return a
    ''')
    out = compress.strip_source(src)
    assert "BLOCK: 'constexpr'" in out and "n: int=4" in out and "-> None" in out
    assert "def plain(a):" in out and "def cached(a):" in out


def test_dataclass_annotations_survive_execution(artifact, tmp_path):
    art = tmp_path / "art.py"
    art.write_bytes(artifact.encode("latin-1"))
    code = ("import dataclasses, art; "
            "print([f.name for f in dataclasses.fields(art.Hyper)], art.Hyper().steps)")
    res = _run(["-c", code], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['lr', 'steps', 'tags', 'name'] 3"


def test_round_trip(stripped, artifact):
    payload = compress.payload_of(artifact)
    assert payload == stripped
    assert ast.dump(ast.parse(payload)) == ast.dump(ast.parse(stripped))
    assert len(artifact) < len(SAMPLE)
    assert artifact.isascii()
    ast.parse(artifact, feature_version=(3, 10))


def test_deterministic(artifact, tmp_path):
    assert compress.build_artifact(SAMPLE) == artifact
    src = tmp_path / "src.py"
    src.write_text(SAMPLE, encoding="utf-8")
    outs = []
    for seed in ("1", "12345"):
        out = tmp_path / f"out{seed}.py"
        res = _run([COMPRESS, "--src", str(src), "--out", str(out)],
                   env={"PYTHONHASHSEED": seed})
        assert res.returncode == 0, res.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == artifact.encode("latin-1")


def test_build_prints_sizes(tmp_path):
    src = tmp_path / "src.py"
    src.write_text(SAMPLE, encoding="utf-8")
    out = tmp_path / "train_gpt.py"
    res = _run([COMPRESS, "--src", str(src), "--out", str(out)])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"source bytes: {len(SAMPLE.encode())}"
    assert lines[1].startswith("stripped bytes: ")
    assert lines[2] == f"artifact bytes: {out.stat().st_size}"


def test_artifact_behaves_like_source(artifact, tmp_path):
    src = tmp_path / "prog.py"
    src.write_text(SAMPLE, encoding="utf-8")
    art = tmp_path / "train_gpt.py"
    art.write_bytes(artifact.encode("latin-1"))
    env = {"PG_TEST_VAR": "hello", "LR": "0.25"}
    a = _run([str(src), "alice"], cwd=tmp_path, env=env)
    b = _run([str(art), "alice"], cwd=tmp_path, env=env)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    la, lb = a.stdout.splitlines(), b.stdout.splitlines()
    assert "who alice env hello" in la[0] and "lr=0.25" in la[1] and la[3] == "name __main__"
    assert la[:3] == lb[:3] and la[3] == lb[3]
    # inspect.getsource works on payload functions (annotations stripped there)
    assert la[4] == "src def scale(x: float, k: float = 2.0, *args: int, key: str = \"a\", **kw: str) -> float:"
    assert lb[4] == "src def scale(x, k=2.0, *args, key='a', **kw):"
    # imported (not run as a script): the __main__ block must not run
    imp = _run(["-c", "import train_gpt; print('imported', train_gpt.__name__)"], cwd=tmp_path)
    assert imp.returncode == 0, imp.stderr
    assert imp.stdout.strip() == "imported train_gpt"


def test_artifact_runs_on_python310(artifact, tmp_path):
    py310 = _other_python(10)
    if py310 is None:
        pytest.skip("no Python 3.10 interpreter found")
    art = tmp_path / "train_gpt.py"
    art.write_bytes(artifact.encode("latin-1"))
    res = _run([str(art), "bob"], cwd=tmp_path, python=py310)
    assert res.returncode == 0, res.stderr
    assert "who bob" in res.stdout and "name __main__" in res.stdout


def test_latin1_codec_round_trip_and_runs(tmp_path):
    art = compress.build_artifact(SAMPLE, codec="latin1")
    assert art.startswith("#coding:l1\n")
    assert compress.payload_of(art) == compress.strip_source(SAMPLE)
    assert len(art) < len(compress.build_artifact(SAMPLE))
    path = tmp_path / "train_gpt.py"
    path.write_bytes(art.encode("latin-1"))
    res = _run([str(path), "carol"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "who carol" in res.stdout


def _write_pair(tmp_path, src_text):
    src = tmp_path / "train_gpt_human.py"
    src.write_text(src_text, encoding="utf-8")
    out = tmp_path / "train_gpt.py"
    return src, out


def test_check_ok_then_stale(tmp_path):
    src, out = _write_pair(tmp_path, SAMPLE)
    missing = _run([COMPRESS, "--check", "--src", str(src), "--out", str(out)])
    assert missing.returncode != 0 and "missing" in missing.stderr
    assert _run([COMPRESS, "--src", str(src), "--out", str(out)]).returncode == 0
    ok = _run([COMPRESS, "--check", "--src", str(src), "--out", str(out)])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == \
        f"ok: train_gpt.py in sync, {out.stat().st_size} bytes, Python 3.10 clean"
    src.write_text(SAMPLE.replace("steps: int = 3", "steps: int = 4"), encoding="utf-8")
    stale = _run([COMPRESS, "--check", "--src", str(src), "--out", str(out)])
    assert stale.returncode != 0
    assert "stale" in stale.stderr


BAD_FSTRING = 'd = {"a": 1}\nprint(f"{d["a"]}")\n'


def test_check_catches_312_only_fstring(tmp_path):
    src, out = _write_pair(tmp_path, BAD_FSTRING)
    res = _run([COMPRESS, "--check", "--src", str(src), "--out", str(out)])
    assert res.returncode != 0
    assert "FAIL" in res.stderr
    assert compress.check_py310(BAD_FSTRING)


def test_pep701_token_check_on_py312(tmp_path):
    py312 = _other_python(12)
    if py312 is None:
        pytest.skip("no Python 3.12 interpreter found")
    code = ("import sys; sys.path.insert(0, %r); import compress, json; "
            "print(json.dumps([compress._pep701_problems(sys.argv[1]), "
            "compress.strip_source(sys.argv[2])]))" % str(REPO))
    ok_src = "d = {'a': 1}\nprint(f\"{d['a']}\", f'{d[\"a\"]:>{3}}')\n"
    res = _run(["-c", code, BAD_FSTRING, ok_src], python=py312)
    assert res.returncode == 0, res.stderr
    import json
    problems, stripped_312 = json.loads(res.stdout)
    assert problems and "PEP 701" in problems[0]
    # 3.12's ast.unparse would emit f'{d['a']}'; compress keeps the original literal
    assert stripped_312 == compress.strip_source(ok_src)
    assert not compress.check_py310(stripped_312)


def test_check_py310_flags_newer_stdlib():
    if compress.importlib.util.find_spec("vermin") is None:
        pytest.skip("vermin not installed")
    assert compress.check_py310("import tomllib\n")
    assert compress.check_py310("x = 1\nmatch x:\n    case 1:\n        pass\n") == []
    # vermin's Python-2 verdicts (it takes tensor.long() for py2 `long`) are ignored
    assert compress.check_py310("import torch\nx = torch.zeros(2).long()\n") == []


def test_check_fails_clearly_without_vermin(monkeypatch):
    monkeypatch.setattr(compress.importlib.util, "find_spec", lambda name: None)
    problems = compress.check_py310("x = 1\n")
    assert problems and "vermin is not installed" in problems[0]
