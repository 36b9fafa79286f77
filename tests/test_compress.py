"""Tests for compress.py (builds the size-counted train_gpt.py artifact)."""
import ast
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import re
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
    class Hyperparameters:
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
        scaled_local_marker: float = x * k
        return scaled_local_marker


    def fmt(d: dict) -> str:
        return f"{d['a']}|{d['b']!r:>6}|" f'{len(d):{"0"}3d}'  # COMMENT_MARKER_3


    def only_doc():
        """ONLY_DOC_MARKER"""


    def main() -> None:
        h = Hyperparameters()
        who = sys.argv[1] if len(sys.argv) > 1 else "nobody"
        print("who", who, "env", os.environ.get("PG_TEST_VAR", "-"))
        print("hyper", h, scale(h.lr), fmt({"a": who, "b": 7}))
        print("plain", Plain.__name__, only_doc(), Counter().value)
        print("name", __name__)
        print("src", inspect.getsource(scale).splitlines()[0])


    if __name__ == "__main__":
        main()
''')


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
def minified():
    return compress.minify_source(SAMPLE)


@pytest.fixture(scope="module")
def artifact():
    return compress.build_artifact(SAMPLE)


def test_comments_and_docstrings_gone(minified):
    for marker in ("MODULE_DOC_MARKER", "CLASS_DOC_MARKER", "FUNC_DOC_MARKER", "ONLY_DOC_MARKER",
                   "COMMENT_MARKER", "a bare string statement", "only a docstring"):
        assert marker not in minified
    toks = list(tokenize.generate_tokens(io.StringIO(minified).readline))
    assert not [t for t in toks if t.type == tokenize.COMMENT]
    assert not [n for n in ast.walk(ast.parse(minified)) if isinstance(n, ast.Expr)
                and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)]
    assert "\n\n" not in minified
    assert len(minified) < 0.6 * len(SAMPLE)


def _defs(tree):
    return {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def _scale(tree):
    """The minified `scale`: module-level names are renamed, so it is found by its parameters."""
    (f,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and [a.arg for a in n.args.args] == ["x", "k"]]
    return f


def test_locals_and_globals_renamed_keyword_names_kept(minified):
    tree = ast.parse(minified)
    names = {t.string for t in tokenize.generate_tokens(io.StringIO(minified).readline) if t.type == tokenize.NAME}
    assert "scaled_local_marker" not in names and "who" not in names  # function locals
    assert {"self", "args", "kw", "h"}.isdisjoint(names)
    top = [{n.name for n in t.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
           for t in (tree, ast.parse(SAMPLE))]
    assert top[1] == {"Hyperparameters", "Plain", "Counter", "scale", "fmt", "only_doc", "main"}
    # module-level functions, classes and constants get short names, except the two a user reaches from outside
    assert compress.PRESERVED_GLOBALS == ["main", "Hyperparameters"]
    assert top[0] & top[1] == {"Hyperparameters", "main"} and len(top[0]) == 7
    assert all(len(name) <= 2 for name in top[0] - top[1])
    a = _scale(tree).args
    # parameters that callers can name keep their names; *args / **kw do not need them
    assert [x.arg for x in a.args] == ["x", "k"] and [x.arg for x in a.kwonlyargs] == ["key"]
    assert len(a.vararg.arg) == 1 and len(a.kwarg.arg) == 1


def test_annotations(minified):
    tree = ast.parse(minified)
    funcs = _defs(tree)
    a = _scale(tree).args
    assert all(x.annotation is None for x in [*a.args, *a.kwonlyargs, a.vararg, a.kwarg])
    assert _scale(tree).returns is None and funcs["main"].returns is None
    # dataclass fields keep names and annotations
    fields = [n.target.id for n in funcs["Hyperparameters"].body if isinstance(n, ast.AnnAssign)]
    assert fields == ["lr", "steps", "tags", "name"]  # their types are builtins, renamed to module aliases
    # other class attributes keep theirs too (remove_class_attribute_annotations=False)
    assert re.search(r"total:(\w+);start:\1=10", minified)
    # attribute and function-local annotations go ("y: float" stays a local, annotated 0)
    assert ".value=" in minified and "value:" not in minified
    assert not [n for n in ast.walk(_scale(tree)) if isinstance(n, ast.AnnAssign) and n.annotation is not None
                and not isinstance(n.annotation, ast.Constant)]


BEHAVIOUR_SRC = textwrap.dedent('''\
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
            label = f"{'big' if x > 2 else 'small'}"
            return math.sqrt(x) + len(msg) + len(block), msg, block, label
    def g(*values, sep="-", **named):
        """doc"""
        joined_values_marker = sep.join(str(v) for v in values)
        return joined_values_marker + str(sorted(named.items()))
    print(A().f(4.0), g(1, 2, sep="+", z=3))
''')


def test_minified_behaves_like_original(tmp_path):
    out = compress.minify_source(BEHAVIOUR_SRC)
    assert "joined_values_marker" not in out and "doc" not in out
    ast.parse(out, feature_version=(3, 10))
    results = []
    for name, text in (("orig.py", BEHAVIOUR_SRC), ("mini.py", out)):
        (tmp_path / name).write_text(text, encoding="utf-8")
        res = _run([str(tmp_path / name)])
        assert res.returncode == 0, res.stderr
        results.append(res.stdout)
    assert results[0] == results[1]
    assert "'big'" in results[0] and "1+2[('z', 3)]" in results[0]


def test_dataclass_annotations_survive_execution(artifact, tmp_path):
    art = tmp_path / "art.py"
    art.write_bytes(artifact.encode("latin-1"))
    code = ("import dataclasses, art; "
            "print([f.name for f in dataclasses.fields(art.Hyperparameters)], art.Hyperparameters().steps)")
    res = _run(["-c", code], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['lr', 'steps', 'tags', 'name'] 3"


def test_round_trip(minified, artifact):
    payload = compress.payload_of(artifact)
    assert payload == minified
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
    assert lines[1] == f"minified bytes: {len(compress.minify_source(SAMPLE).encode())}"
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
    assert la[:2] == lb[:2] and la[3] == lb[3]
    # the one visible difference of renamed globals: a class's __name__ (nothing in the trainer reads its own)
    assert la[2] == "plain Plain None 10" and lb[2].startswith("plain ") and lb[2].endswith(" None 10")
    # inspect.getsource works on payload functions (minified there)
    assert la[4] == "src def scale(x: float, k: float = 2.0, *args: int, key: str = \"a\", **kw: str) -> float:"
    assert lb[4].startswith("src def ") and lb[4].endswith("(x,k=2.,*B,key='a',**C):D:0;A=x*k;return A")
    # imported (not run as a script): the __main__ block must not run
    imp = _run(["-c", "import train_gpt; print('imported', train_gpt.__name__)"], cwd=tmp_path)
    assert imp.returncode == 0, imp.stderr
    assert imp.stdout.strip() == "imported train_gpt"


def test_artifact_runs_on_python310(artifact, tmp_path):
    py310 = _other_python(10)
    if py310 is None:
        pytest.skip("no Python 3.10 interpreter found")
    if subprocess.run([py310, "-c", "import brotli"], capture_output=True).returncode:
        pytest.skip(f"brotli (the artifact's decompressor) is not installed for {py310}; .ci/run installs it")
    art = tmp_path / "train_gpt.py"
    art.write_bytes(artifact.encode("latin-1"))
    res = _run([str(art), "bob"], cwd=tmp_path, python=py310)
    assert res.returncode == 0, res.stderr
    assert "who bob" in res.stdout and "name __main__" in res.stdout


def test_latin1_codec_round_trip_and_runs(tmp_path):
    art = compress.build_artifact(SAMPLE, codec="latin1")
    assert art.startswith("#coding:l1\n")
    assert compress.payload_of(art) == compress.minify_source(SAMPLE)
    assert len(art) < len(compress.build_artifact(SAMPLE))
    path = tmp_path / "train_gpt.py"
    path.write_bytes(art.encode("latin-1"))
    res = _run([str(path), "carol"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "who carol" in res.stdout


@pytest.mark.parametrize("n", [1, 66, 67, 68, 134, 1000])
def test_b94_codec_round_trips_every_length_in_printable_ascii(n):
    """b94: 67 bytes per 82 characters in a raw triple-quoted bytes literal, the blob zero-padded to whole groups and
    cut back to its length; every character printable ASCII other than "'", so the file stays ASCII."""
    blob = bytes((i * 167 + 13) % 256 for i in range(n)) + b"\xff" * min(n, 67)  # high bytes: the largest digits
    expr = compress._encode(blob, "b94")
    literal = expr[expr.index("(br'''") + 6:expr.index("''')[:")]
    assert len(literal) - -(-len(blob) // 67) * 82 in (0, 1) and set(literal) <= set(map(chr, range(32, 127))) - {"'"}
    assert eval(expr, {"__builtins__": {f.__name__: f for f in (sum, enumerate, range, len)}}) == blob


def test_b94_literal_never_ends_in_a_backslash():
    """The literal's last character is a group's top digit, at most 256^67 / 94^81 < 34: never the backslash (digit
    59), which would escape the closing quote.  The largest group shows it."""
    assert 256 ** 67 // 94 ** 81 < 34
    literal = compress._b94_literal(b"\xff" * 67)
    assert literal[-4] == chr(256 ** 67 // 94 ** 81 + 32 + 1) and not literal[:-3].endswith("\\")


def test_the_real_artifact_is_b94_ascii_and_smaller_than_base85():
    artifact = (compress.HERE / "train_gpt.py").read_text()
    assert "94**i" in artifact and artifact.isascii()
    payload = compress.payload_of(artifact)
    assert len(artifact) + 300 < len(compress.build_artifact(payload, codec="b85", minified=True))


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


def _copy_python_minifier(dest):
    """python-minifier (pure Python) and its metadata, for another interpreter's sys.path."""
    import python_minifier
    site = Path(python_minifier.__file__).parent.parent
    shutil.copytree(site / "python_minifier", dest / "python_minifier",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (info,) = site.glob("python_minifier-*.dist-info")
    shutil.copytree(info, dest / info.name)


PEP701_BAIT = "x = 3\nprint(f\"{'big' if x > 2 else 'small'}\")\n"


@pytest.mark.parametrize("minor", [12, 13])
def test_minify_on_py312_plus_writes_py310_fstrings(minor, tmp_path):
    python = _other_python(minor)
    if python is None:
        pytest.skip(f"no Python 3.{minor} interpreter found")
    _copy_python_minifier(tmp_path)
    code = ("import sys, json; sys.path[:0] = [%r, %r]; import compress, python_minifier; "
            "src, bad = sys.argv[1:]; plain = python_minifier.minify(src, **compress.MINIFY_OPTIONS); "
            "print(json.dumps([compress._pep701_problems(bad), compress._pep701_problems(plain), "
            "compress.minify_source(src)]))" % (str(tmp_path), str(REPO)))
    res = _run(["-c", code, PEP701_BAIT, BAD_FSTRING], python=python)
    assert res.returncode == 0, res.stderr
    bad_problems, plain_problems, minified_new = json.loads(res.stdout)
    assert bad_problems and "PEP 701" in bad_problems[0]
    # left alone, python-minifier on 3.12+ reuses the quote inside the f-string ...
    assert plain_problems and "PEP 701" in plain_problems[0]
    # ... compress.minify_source does not, and matches this interpreter's output
    assert minified_new == compress.minify_source(PEP701_BAIT) == "A=3\nprint(f\"{'big'if A>2 else'small'}\")"
    assert not compress.check_py310(minified_new)


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


# ----------------------------------------------------------- the real train_gpt_human.py

REAL_SRC = REPO / "train_gpt_human.py"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(source, payload, dir holding the freshly built artifact as train_gpt.py)."""
    src = REAL_SRC.read_text(encoding="utf-8")
    payload = compress.minify_source(src)
    out = tmp_path_factory.mktemp("real")
    (out / "train_gpt.py").write_bytes(compress.build_artifact(payload, minified=True).encode("latin-1"))
    return src, payload, out


def _function_only_names(tree):
    """Names bound only inside functions: never an argument, attribute, keyword, import part,
    def/class name or module-level binding, so renaming them cannot change behaviour."""
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in funcs for n in ast.walk(f)}
    local, other = set(), set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            (local if id(n) in inside else other).add(n.id)
        elif isinstance(n, ast.arg):
            other.add(n.arg)
        elif isinstance(n, ast.Attribute):
            other.add(n.attr)
        elif isinstance(n, ast.keyword) and n.arg:
            other.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            other.add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            other.update(n.names)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            other.update(p for a in n.names for p in (a.name.split(".") + [a.asname or ""]))
    return local - other


def test_real_payload_is_minified_and_py310(real):
    src, payload, _ = real
    tree = ast.parse(payload, feature_version=(3, 10))
    assert not compress.check_py310(payload)
    assert len(payload.encode()) < 0.65 * len(src.encode())  # 42,405 of 73,405 bytes when written
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Expr)
                and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)]
    long_locals = {n for n in _function_only_names(ast.parse(src)) if len(n) >= 8}
    assert len(long_locals) >= 20, sorted(long_locals)
    names = {t.string for t in tokenize.generate_tokens(io.StringIO(payload).readline) if t.type == tokenize.NAME}
    assert long_locals.isdisjoint(names), sorted(long_locals & names)
    assert "python_minifier" not in payload


_SHAPE = textwrap.dedent('''\
    import dataclasses, inspect, json, sys
    sys.modules["python_minifier"] = None  # the artifact must run without it
    import train_gpt, train_gpt_human

    def params(f, method):
        """Names callers can use; python-minifier renames self / cls and *args / **kwargs."""
        return [("?" if (method and i == 0) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) else p.name,
                 str(p.kind), repr(p.default)) for i, p in enumerate(inspect.signature(f).parameters.values())]

    def shape(m):
        public = {k: v for k, v in vars(m).items() if not k.startswith("_")}
        sigs = {}
        for k, v in public.items():
            if getattr(v, "__module__", None) != m.__name__:
                continue
            if inspect.isfunction(v):
                sigs[k] = params(v, False)
            elif inspect.isclass(v):
                for name, attr in vars(v).items():
                    attr = getattr(attr, "__func__", getattr(attr, "fget", attr))
                    if inspect.isfunction(attr):
                        sigs[k + "." + name] = params(attr, True)
        fields = {k: [(f.name, repr(f.type), repr(f.default)) for f in dataclasses.fields(v)]
                  for k, v in public.items() if dataclasses.is_dataclass(v)}
        return {"public": sorted(public), "signatures": sigs, "fields": fields}

    hp = train_gpt.Hyperparameters.from_env({"NUM_LAYERS": "3", "MLP_MULT": "2.5", "RUN_ID": "x"})
    print(json.dumps([shape(train_gpt), shape(train_gpt_human), [hp.num_layers, hp.mlp_mult, hp.run_id]]))
''')


def test_real_artifact_exposes_the_same_names_fields_and_signatures(real):
    _, _, out = real
    res = _run(["-c", _SHAPE], cwd=out, env={"PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    art, src, hp = json.loads(res.stdout)
    assert {"linecache", "brotli"} <= set(art["public"])  # the stub's imports
    # the names a user reaches from outside keep their names and signatures; the rest are renamed
    kept = {k: v for k, v in src["signatures"].items() if k.split(".")[0] in compress.PRESERVED_GLOBALS}
    assert set(compress.PRESERVED_GLOBALS) <= set(art["public"]) and len(kept) >= 5
    assert {k: v for k, v in art["signatures"].items() if k in kept} == kept
    assert art["fields"]["Hyperparameters"] == src["fields"]["Hyperparameters"]  # names, types and defaults
    assert len(art["fields"]["Hyperparameters"]) > 50
    assert hp == [3, 2.5, "x"]


@pytest.mark.parametrize("var,value,message", [
    ("TTT_EPOCH", "2", "error: unknown setting TTT_EPOCH='2': did you mean TTT_EPOCHS?"),
    ("NUM_LAYERS", "x", "error: NUM_LAYERS='x' is not a valid int"),
])
def test_real_artifact_reports_config_errors_like_the_source(real, var, value, message):
    _, _, out = real
    env = {k: os.environ[k] for k in ("PATH", "HOME", "SYSTEMROOT") if k in os.environ}
    env[var] = value
    for script in (out / "train_gpt.py", REAL_SRC):
        res = subprocess.run([sys.executable, str(script)], cwd=out, env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1, (script, res.stderr)
        assert res.stderr.strip().splitlines()[-1] == message, (script, res.stderr)


def test_runs_of_assignments_are_packed_only_where_order_cannot_matter():
    """The payload packs `a = x` / `b = y` into `a, b = x, y` (the readable source keeps one name per line), except
    where a value reads an earlier target, calls something that could (at module level, or with the targets' root
    in the call), or repeats a target."""
    src = textwrap.dedent('''
        A = 1
        B = 2
        C = len("x")
        def f(self, n):
            x = n + 1
            y = n * 2
            z = x + y
            self.a = n
            self.b = helper(self)
            self.c = helper(n)
            w = 1
            w = 2
            return x, y, z, w
        ''')
    packed = ast.unparse(compress._PackAssignments().visit(ast.parse(src)))
    assert packed.splitlines()[:2] == ["A, B = (1, 2)", "C = len('x')"]  # a module-level call stays alone
    body = [line.strip() for line in packed.split("def f(self, n):")[1].strip().splitlines()]
    assert body == ["x, y = (n + 1, n * 2)",
                    "z, self.a = (x + y, n)",  # z reads x: a new run
                    "self.b, self.c, w = (helper(self), helper(n), 1)",  # helper(self) may read self.a: a new run
                    "w = 2",  # a repeated target: a new run
                    "return (x, y, z, w)"]
