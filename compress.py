#!/usr/bin/env python3
"""Build the size-counted artifact ``train_gpt.py`` from ``train_gpt_human.py``.

Pipeline:
  1. minify with python-minifier (``MINIFY_OPTIONS``): docstrings, comments and blank
     lines go, indentation becomes one tab per level, and function locals (also
     ``self`` / ``cls`` and ``*args`` / ``**kwargs``) get one- or two-letter names.
     Parameters that callers can pass by keyword, module-level names and class
     attributes keep their names (tests and tools import functions by name;
     ``Hyperparameters`` maps field names to environment variables), and so do dataclass
     field annotations (``dataclasses.fields`` needs them).  The payload is written for
     Python 3.10 whatever Python runs this script (see ``minify_source``).
  2. pack: lzma at the strongest setting (a small grid of container formats and
     literal/position parameters; the smallest wins) and base85, wrapped in a short
     stub that decompresses the payload, registers it with ``linecache`` (so
     ``inspect.getsource`` works for functions, e.g. for Triton kernels) and execs it
     in the module's own globals (so ``__name__``, ``__file__`` and
     ``if __name__ == "__main__":`` behave exactly as in the source).

Usage:
  python3 compress.py            build train_gpt.py and print the sizes
  python3 compress.py --check    verify train_gpt.py is up to date and Python 3.10 clean
Options --src/--out select other files (used by the tests).
"""
from __future__ import annotations

import argparse
import ast
import base64
import importlib.metadata
import importlib.util
import io
import lzma
import os
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path
from unittest import mock

import python_minifier
from python_minifier.expression_printer import ExpressionPrinter
from python_minifier.f_string import OuterFString

HERE = Path(__file__).resolve().parent
DEFAULT_SRC = HERE / "train_gpt_human.py"
DEFAULT_OUT = HERE / "train_gpt.py"

# co_filename of the exec'd payload; also its key in linecache.
PAYLOAD_FILENAME = "train_gpt_payload"
TARGET_VERSION = (3, 10)

_MINIFIER_VERSION = importlib.metadata.version("python-minifier")  # pinned in requirements-dev.txt
# Measured on train_gpt_human.py when this was chosen (artifact bytes, b85): 19,106; with
# hoist_literals=True (the library default: repeated strings become module-level names)
# 19,158, so it stays off.  rename_globals=True saves 1,070 bytes (29,311 -> 28,241 with lzma,
# measured 2026-12-07): module-level functions, classes and constants get short names in the
# artifact; tests, tools and readers import from train_gpt_human.py, and the artifact keeps the
# two names a user reaches from outside (PRESERVED_GLOBALS).
PRESERVED_GLOBALS = ["main", "Hyperparameters"]
MINIFY_OPTIONS = dict(
    remove_literal_statements=True,  # docstrings and other bare literal statements
    remove_annotations=python_minifier.RemoveAnnotationsOptions(
        remove_variable_annotations=True, remove_return_annotations=True,
        remove_argument_annotations=True,  # would break a @triton.jit kernel's tl.constexpr
        remove_class_attribute_annotations=False),  # dataclass fields need theirs
    rename_locals=True,
    rename_globals=True,
    preserve_globals=PRESERVED_GLOBALS,
    hoist_literals=False,
    preserve_shebang=False,  # the payload is exec'd, never run as a file
)

_LZMA_PRESET = 9 | lzma.PRESET_EXTREME
_CODECS = ("b94", "b85", "b64", "latin1")
# Codec used by both the build and --check unless --codec is given ("auto" = the smallest of b94/b85/b64).
DEFAULT_CODEC = "auto"


# -------------------------------------------------------------------------- minify

def _visit_joinedstr_py310(self, node):
    self.printer.fstring(str(OuterFString(node, pep701=False)))


def minify_source(src: str) -> str:
    """``src`` minified by python-minifier with MINIFY_OPTIONS, as Python 3.10 code.

    python-minifier writes code for the interpreter it runs on and has no target-version
    option (dflook/python-minifier#148): on Python >= 3.12 it may reuse an f-string's quote
    inside the f-string (PEP 701), which 3.10 cannot parse.  Its f-string printer for
    < 3.12 is forced instead; the output is then the same on Python 3.10 to 3.13."""
    src = ast.unparse(_PackAssignments().visit(ast.parse(src)))
    with mock.patch.object(ExpressionPrinter, "visit_JoinedStr", _visit_joinedstr_py310):
        return python_minifier.minify(src, **MINIFY_OPTIONS)


class _PackAssignments(ast.NodeTransformer):
    """Runs of simple assignments become one tuple assignment in the payload: `a = x` then `b = y` -> `a, b = x, y`
    (about 1 compressed byte each).  The readable source writes one name per line; this is the minifier's business.
    Merged only where the order cannot matter: no value reads a name assigned before it in the run, a value calls
    nothing that could read one (none at module level; none with `self`, or whatever the targets hang from, in it),
    and the targets are plain names or attributes, all different."""

    def generic_visit(self, node):
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                setattr(node, field, self._pack(stmts, isinstance(node, ast.Module)))
        return node

    @staticmethod
    def _simple(stmt):
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
            return False
        target = stmt.targets[0]
        while isinstance(target, ast.Attribute):  # self.x, a.b.c: a chain of names only
            target = target.value
        return isinstance(target, ast.Name) and not isinstance(stmt.value, ast.Starred)

    @staticmethod
    def _fits(run, stmt, module):
        targets = [ast.unparse(s.targets[0]) for s in run]
        roots = {t.split(".")[0] for t in targets}
        value = stmt.value
        if ast.unparse(stmt.targets[0]) in targets:
            return False
        for n in ast.walk(value):
            if isinstance(n, (ast.Name, ast.Attribute)) and ast.unparse(n) in targets:
                return False
            if isinstance(n, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
                return False
            if isinstance(n, ast.Call) and (module or any(isinstance(m, ast.Name) and m.id in roots
                                                          for m in ast.walk(n))):
                return False
        return True

    def _pack(self, stmts, module):
        out, run = [], []
        for stmt in stmts + [None]:
            if stmt is not None and self._simple(stmt) and (not run or self._fits(run, stmt, module)):
                run.append(stmt)
                continue
            if len(run) > 1:
                out.append(ast.copy_location(ast.Assign(
                    targets=[ast.Tuple([s.targets[0] for s in run], ast.Store())],
                    value=ast.Tuple([s.value for s in run], ast.Load())), run[0]))
            else:
                out.extend(run)
            run = [stmt] if stmt is not None and self._simple(stmt) else []
            if stmt is not None and not self._simple(stmt):
                out.append(stmt)
        return out


# ---------------------------------------------------------------------------- pack

def _candidates(data: bytes):
    """(decompress-call template, compressed bytes); template has {} for the blob.  brotli (quality 11)
    beats the best lzma on this code by ~3.5% (22,551 against 23,356 bytes, measured 2026-12-07); the
    artifact then needs brotli to start, as its weights already do."""
    import brotli  # here, so that minifying alone runs on interpreters without it (the 3.12+ tests)

    yield "brotli.decompress({})", brotli.compress(data, quality=11, lgwin=24)
    dict_size = 1 << max(12, (len(data) - 1).bit_length())
    best_alone = None
    # lp=0 always wins on text; lc=1 equals lc=0 on ASCII, so it is skipped.
    for lc in (0, 2, 3, 4):
        for pb in (0, 1, 2):
            for nice_len in (64, 273):
                filt = {"id": lzma.FILTER_LZMA1, "preset": _LZMA_PRESET,
                        "dict_size": dict_size, "lc": lc, "lp": 0, "pb": pb,
                        "nice_len": nice_len}
                blob = lzma.compress(data, format=lzma.FORMAT_ALONE, filters=[filt])
                if best_alone is None or len(blob) < len(best_alone[1]):
                    best_alone = (filt, blob)
    filt = dict(best_alone[0], id=lzma.FILTER_LZMA2)
    yield "lzma.decompress({})", best_alone[1]
    yield "lzma.decompress({})", lzma.compress(
        data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=[filt])
    yield ("lzma.decompress({},lzma.FORMAT_RAW,None,[{{'id':lzma.FILTER_LZMA2}}])",
           lzma.compress(data, format=lzma.FORMAT_RAW, filters=[filt]))


def _latin1_literal(blob: bytes) -> str:
    out = ['"']
    for i, b in enumerate(blob):
        c = chr(b)
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\0":
            nxt = blob[i + 1:i + 2]
            out.append("\\x00" if nxt and nxt in b"01234567" else "\\0")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


# b94: 67 bytes as 82 digits base 94 (94^82 > 256^67), little-endian, each digit one printable ASCII character
# other than "'", in a raw triple-quoted bytes literal (so a backslash is a digit like any other): 1.224 characters
# per byte against base85's 1.25, for a decoder of about 140 bytes.  The blob is zero-padded to whole groups and cut
# back to its length after decoding.  A group's top digit is at most 256^67 / 94^81 < 34, so the literal never ends
# in a backslash (digit 59), which would escape the closing quote.
B94_GROUP, B94_DIGITS = 67, 82


def _b94_literal(blob: bytes) -> str:
    out = []
    padded = blob + bytes(-len(blob) % B94_GROUP)
    for j in range(0, len(padded), B94_GROUP):
        n = int.from_bytes(padded[j:j + B94_GROUP], "little")
        for _ in range(B94_DIGITS):
            n, digit = divmod(n, 94)
            out.append(chr(digit + 32 + (digit + 32 >= 39)))  # skip "'"
    return "br'''" + "".join(out) + "'''"


def _encode(blob: bytes, codec: str) -> str:
    if codec == "b94":
        return ('(lambda d:b"".join(sum((c-32-(c>39))*94**i for i,c in enumerate(d[j:j+82])).to_bytes(67,"little")'
                'for j in range(0,len(d),82)))(' + _b94_literal(blob) + f')[:{len(blob)}]')
    if codec == "b85":
        return 'base64.b85decode("' + base64.b85encode(blob).decode("ascii") + '")'
    if codec == "b64":
        return 'base64.b64decode("' + base64.b64encode(blob).decode("ascii") + '")'
    if codec == "latin1":
        return _latin1_literal(blob) + '.encode("l1")'
    raise ValueError(f"unknown codec {codec!r}")


def _stub(call: str, codec: str) -> str:
    head = "#coding:l1\n" if codec == "latin1" else ""
    imports = "import " + call.split(".")[0] + ("" if codec in ("latin1", "b94") else ",base64") + ",linecache"
    return (head + imports + "\n"
            "(lambda s,f:(linecache.cache.__setitem__(f,(len(s),None,s.splitlines(1),f)),"
            'exec(compile(s,f,"exec"),globals())))(' + call + '.decode(),"'
            + PAYLOAD_FILENAME + '")\n')


def build_artifact(src: str, codec: str = "auto", minified: bool = False) -> str:
    """Self-extracting artifact for ``src`` (minified first unless ``minified``).

    The returned text is meant to be written with latin-1 encoding (it is pure ASCII
    for the b94/b85/b64 codecs).  ``codec="auto"`` picks the smallest of b94, b85 and b64;
    ``codec="latin1"`` (opt-in) stores the raw lzma bytes in a latin-1 string literal,
    about 18% smaller, but the file is then not valid UTF-8 (read it as bytes)."""
    payload = src if minified else minify_source(src)
    data = payload.encode("utf-8")
    codecs = ("b94", "b85", "b64") if codec == "auto" else (codec,)
    best = None
    for template, blob in _candidates(data):
        for c in codecs:
            art = _stub(template.format(_encode(blob, c)), c)
            if best is None or len(art) < len(best):
                best = art
    return best


def _find_decompress_call(tree: ast.AST) -> ast.Call:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "decompress" and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("lzma", "brotli")):
            return node
    raise ValueError("not a compress.py artifact (no lzma or brotli decompress call)")


def payload_of(artifact: str) -> str:
    """Recover the payload source from an artifact's text (latin-1 decoded)."""
    call = _find_decompress_call(ast.parse(artifact))
    expr = ast.fix_missing_locations(ast.Expression(body=call))
    import brotli

    builtins = {f.__name__: f for f in (sum, enumerate, range, len)}  # b94's decoder
    ns = {"lzma": lzma, "brotli": brotli, "base64": base64, "__builtins__": builtins}
    data = eval(compile(expr, "<artifact>", "eval"), ns)  # only our own decode call
    return data.decode("utf-8")


# ------------------------------------------------------------------- 3.10 checks

def _pep701_problems(src: str) -> list[str]:
    """Token-level check for f-string syntax that only Python >= 3.12 accepts
    (same quote reused inside, backslash or comment in an expression part).  On
    interpreters < 3.12 such code already fails ``ast.parse``; this covers 3.12+."""
    fs_start = getattr(tokenize, "FSTRING_START", None)
    if fs_start is None:
        return []
    fs_mid, fs_end = tokenize.FSTRING_MIDDLE, tokenize.FSTRING_END
    problems, stack = [], []
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError) as e:
        return [f"tokenize failed: {e}"]
    for tok in tokens:
        if stack and tok.type not in (fs_mid, fs_end):
            bad = None
            if tok.type == tokenize.COMMENT:
                bad = "comment inside an f-string expression"
            elif "\\" in tok.string and tok.type in (tokenize.STRING, fs_start):
                bad = "backslash inside an f-string expression"
            elif tok.type in (tokenize.STRING, fs_start):
                for quote in stack:
                    if quote in tok.string:
                        bad = f"f-string reuses its enclosing quote {quote}"
                        break
            if bad:
                problems.append(f"line {tok.start[0]}: {bad} (Python 3.12+ only, PEP 701): "
                                f"{tok.line.strip()[:120]}")
        if tok.type == fs_start:
            body = tok.string.lstrip("rRfFbBuU")
            stack.append(body[:3] if body[:3] in ('"""', "'''") else body[:1])
        elif tok.type == fs_end and stack:
            stack.pop()
    return problems


_VERMIN_BOOT = "import sys;from vermin.main import main;sys.exit(main())"


def _vermin_problems(src: str) -> list[str]:
    """Run vermin on ``src``; report parse errors and features needing Python > 3.10.

    Python-2-only verdicts ("!3") are ignored: they are false positives on this kind of
    code (vermin takes torch's ``tensor.long()`` for Python 2's ``long``)."""
    if importlib.util.find_spec("vermin") is None:
        return [f"vermin is not installed for {sys.executable}; "
                f"install it with: {sys.executable} -m pip install vermin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "payload.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(src)
        proc = subprocess.run(
            [sys.executable, "-c", _VERMIN_BOOT, "--format", "parsable",
             "--target=%d.%d-" % TARGET_VERSION, "--violations", "--no-config-file",
             "-p=1", path],
            capture_output=True, text=True, cwd=tmp)
    problems, seen_summary = [], False
    for line in proc.stdout.splitlines():
        if not line.startswith(path + ":"):
            seen_summary |= line.startswith(":::")
            continue
        row, _col, _py2, py3, feature = line[len(path) + 1:].split(":", 4)
        if not row:
            continue
        if feature.startswith("error"):
            problems.append(f"vermin: line {row}: {feature}")
        elif py3.startswith("3."):
            need = tuple(int(x) for x in py3.split(".") if x.isdigit())
            if need > TARGET_VERSION:
                problems.append(f"vermin: line {row}: {feature} requires Python {py3}")
    if not seen_summary:  # exit code 1 just means "target not met"; no summary = crash
        problems.append(f"vermin failed (exit code {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return problems


def check_py310(src: str) -> list[str]:
    """Problems that would stop ``src`` from running on Python 3.10 ([] = clean)."""
    problems = []
    try:
        ast.parse(src, feature_version=TARGET_VERSION)
    except SyntaxError as e:
        problems.append(f"not valid Python 3.10 syntax: line {e.lineno}: {e.msg}")
    problems += _pep701_problems(src)
    problems += _vermin_problems(src)
    return problems


# ---------------------------------------------------------------------------- CLI

def _read_artifact(path: Path) -> str:
    return path.read_bytes().decode("latin-1")


def _build(src_path: Path, out_path: Path, codec: str) -> int:
    src = src_path.read_text(encoding="utf-8")
    payload = minify_source(src)
    art = build_artifact(payload, codec=codec, minified=True)
    out_path.write_bytes(art.encode("latin-1"))
    n_src, n_pay, n_art = len(src.encode("utf-8")), len(payload.encode("utf-8")), len(art)
    print(f"source bytes: {n_src}")
    print(f"minified bytes: {n_pay}")
    print(f"artifact bytes: {n_art}")
    for p in check_py310(payload):
        print(f"WARNING: {p}", file=sys.stderr)
    return 0


def _check(src_path: Path, out_path: Path, codec: str) -> int:
    fails = []
    try:
        src = src_path.read_text(encoding="utf-8")
        payload = minify_source(src)
    except FileNotFoundError:
        print(f"FAIL: source {src_path} not found", file=sys.stderr)
        return 1
    except SyntaxError as e:
        print(f"FAIL: {src_path} does not parse on Python {sys.version.split()[0]}: "
              f"line {e.lineno}: {e.msg}", file=sys.stderr)
        return 1
    want = build_artifact(payload, codec=codec, minified=True)
    if not out_path.exists():
        fails.append(f"{out_path.name} is missing; build it with: python3 compress.py")
    else:
        have = _read_artifact(out_path)
        if have != want:
            try:
                same_payload = payload_of(have) == payload
            except Exception:
                same_payload = False
            if same_payload:
                fails.append(f"{out_path.name} has the current payload but different bytes "
                             "(built with another Python/liblzma/codec?); rebuild with: "
                             "python3 compress.py")
            else:
                fails.append(f"{out_path.name} is stale (differs from {src_path.name} minified by "
                             f"python-minifier {_MINIFIER_VERSION}); rebuild with: python3 compress.py")
    fails += [f"payload: {p}" for p in check_py310(payload)]
    if fails:
        for f in fails:
            print(f"FAIL: {f}", file=sys.stderr)
        return 1
    print(f"ok: {out_path.name} in sync, {len(want)} bytes, Python 3.10 clean")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build / check the compressed train_gpt.py")
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true",
                    help="fail if --out is stale or the payload is not Python 3.10 clean")
    ap.add_argument("--codec", choices=("auto",) + _CODECS, default=DEFAULT_CODEC,
                    help="blob encoding (auto = smallest of b94/b85/b64; latin1 is opt-in)")
    args = ap.parse_args(argv)
    if args.check:
        return _check(args.src, args.out, args.codec)
    return _build(args.src, args.out, args.codec)


if __name__ == "__main__":
    sys.exit(main())
