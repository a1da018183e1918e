"""Habits of the code base that a reader relies on: the package's docstrings and comments say
what and why without measurements (figures live in the benchmark JSON and docs/BENCHMARKS.md),
and the model's constructor has no speed-only options (those are smca_d2.speedups)."""

import inspect
import io
import os
import re
import tokenize

from conftest import REPO

# A duration, a throughput or a speed-up factor: "0.36 s", "12 min", "3 ms/it", "2.1x faster".
TIMING = re.compile(
    r"\b\d+(\.\d+)?\s*(ms|s|sec|seconds?|min|minutes?|h|hours?)\b(?![-\w])"
    r"|\b\d+(\.\d+)?\s*(s|ms)\s*/\s*(it|iter|iteration|image|img|step)\b"
    r"|\b(it|iter|images?|img)\s*/\s*s\b"
    r"|\b\d+(\.\d+)?\s*x\s+(faster|slower|less|more|the)\b",
    re.IGNORECASE,
)


def _docs_and_comments(path):
    """(line, text) of every comment and string literal that stands alone as a statement (the
    docstrings) in ``path``."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    previous = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if (
            tok.type == tokenize.COMMENT
            or tok.type == tokenize.STRING
            and previous in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
        ):
            yield tok.start[0], tok.string
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            previous = tok.type


def _package_files():
    root = os.path.join(REPO, "smca_d2")
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("configs", "__pycache__")]  # model_zoo/configs: a link
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def test_the_timing_pattern_catches_measurements():
    for text in ("0.36 s per iteration", "took 12 min", "2.1x faster", "0.19 s/it", "3.5 images/s"):
        assert TIMING.search(text), text
    for text in ("stride 8", "the 3x3 conv", "s = gamma / sqrt(var)", "beta 8", "top-k 100"):
        assert not TIMING.search(text), text


def test_package_docstrings_and_comments_carry_no_timings():
    found = []
    for path in _package_files():
        for line, text in _docs_and_comments(path):
            for match in TIMING.finditer(text):
                found.append(f"{os.path.relpath(path, REPO)}:{line}: ...{match.group(0)}...")
    assert not found, "measurements belong in the benchmark JSON and docs/BENCHMARKS.md:\n" + "\n".join(found)


def test_the_model_constructor_has_no_speed_only_options():
    from smca_d2.modeling import SMCADETR

    params = set(inspect.signature(SMCADETR.__init__).parameters)
    speed_only = {"channels_last", "fuse_frozen_bn", "fast_cpu_stem", "fast_cpu_dropout"}
    assert not params & speed_only
