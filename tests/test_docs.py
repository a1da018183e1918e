"""The documentation: generated benchmark tables, and every command the docs show.

* docs/BENCHMARKS.md's tables are what docs/generate_benchmark_tables.py writes from
  docs/benchmarks/*.json: editing a table or the JSON alone fails here.
* Every command line of a ```bash / ```sh / ```console block in README.md and docs/*.md is
  covered: a `python SCRIPT.py` line names a script whose own argument parser has each flag shown
  (and, with `--config-file`, a config that has each `key=value` key shown); a `make TARGET` line
  names a target of the Makefile, with environment variables that the Makefile or
  scripts/bootstrap.sh read and a recipe whose commands are checked the same way; `srun ...
  bash -c '...'` is checked by its inner command; anything else must be in ``COVERED_BY``, with
  the tests that run it.
"""

import argparse
import ast
import glob
import json
import os
import re
import shlex
import shutil

import pytest
from conftest import REPO, load_script

DOC_FILES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))

# Commands that are not a repository script or a make target, with the tests that run them.
COVERED_BY = {
    "pip install -e .": ["tests/test_packaging.py::test_wheel_works_outside_the_source_tree"],
    "pip install -e .[test]": ["tests/test_packaging.py::test_wheel_works_outside_the_source_tree"],
    # make test installs the same packages (requirements/export.txt) and runs the export tests.
    "pip install -e .[export]": [
        "tests/inference/test_export.py::test_onnx_runtime_gives_the_eager_detections_at_every_size"
    ],
    "bash tools/gpu_check.sh --output DIR": [
        "tests/test_gpu_check.py::test_dry_run_prints_the_table_and_writes_the_json"
    ],
    "bash tools/gpu_check.sh --dry-run": ["tests/test_gpu_check.py::test_full_dry_run"],
    # The opt-in equivalence test with the official multi-scale code (SMCA_OFFICIAL_MS_REPO).
    "python -m pytest tests/test_convert_official_multi_scale.py -k equivalence -s": [
        "tests/test_convert_official_multi_scale.py::test_equivalence_with_the_official_multi_scale_code"
    ],
}
# Environment variables given to a make command, beyond what the Makefile / bootstrap.sh read,
# with the tests that exercise them.
ENV_COVERED_BY = {
    "SMCA_D2_SYSTEM_SITE": ["tests/test_packaging.py::test_system_site_bootstrap_leaves_installed_packages_alone"],
}


# ---------------------------------------------------------------------------------------------
# Generated benchmark tables
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tables():
    return load_script("docs/generate_benchmark_tables.py")


def _copy_docs(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    shutil.copy(os.path.join(REPO, "docs", "BENCHMARKS.md"), page)
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    for name in load_script("docs/generate_benchmark_tables.py").SOURCES.values():
        shutil.copy(os.path.join(REPO, "docs", "benchmarks", name), bench / name)
    return page, bench


def test_benchmark_tables_are_what_the_json_gives(tables, tmp_path):
    page, bench = _copy_docs(tmp_path)
    assert tables.main(["--page", str(page), "--benchmarks", str(bench)]) == 0
    with open(os.path.join(REPO, "docs", "BENCHMARKS.md"), "rb") as f:
        committed = f.read()
    assert page.read_bytes() == committed, (
        "docs/BENCHMARKS.md differs from what docs/generate_benchmark_tables.py writes from "
        "docs/benchmarks/*.json: run `python docs/generate_benchmark_tables.py`"
    )
    assert tables.main(["--page", str(page), "--benchmarks", str(bench), "--check"]) == 0


def test_benchmark_tables_show_the_json_figures(tables):
    with open(os.path.join(REPO, "docs", "benchmarks", "speed.json")) as f:
        speed = json.load(f)
    text = tables.render_speed(speed)
    row = speed["single_scale"]["train"][0]
    assert f"{row['official']['s_per_iter'] / row['ours']['s_per_iter']:.2f}x" in text
    assert speed["environment"]["processor"] in text and speed["environment"]["torch"] in text
    # Deterministic: the same JSON gives the same text.
    assert tables.render_speed(speed) == text


def test_a_changed_json_changes_the_page_and_a_hand_edit_is_caught(tables, tmp_path):
    page, bench = _copy_docs(tmp_path)
    committed = page.read_text()
    # A hand edit of a generated table: --check fails, and regenerating restores the table.
    edited = committed.replace("| 800x1066, 2 | 5.65 |", "| 800x1066, 2 | 4.65 |")
    assert edited != committed
    page.write_text(edited)
    assert tables.main(["--page", str(page), "--benchmarks", str(bench), "--check"]) == 1
    tables.main(["--page", str(page), "--benchmarks", str(bench)])
    assert page.read_text() == committed
    # A changed JSON: the table changes, and only inside the markers.
    speed = json.loads((bench / "speed.json").read_text())
    speed["single_scale"]["train"][0]["ours"]["s_per_iter"] = 4.0
    (bench / "speed.json").write_text(json.dumps(speed))
    assert tables.main(["--page", str(page), "--benchmarks", str(bench), "--check"]) == 1
    tables.main(["--page", str(page), "--benchmarks", str(bench)])
    new = page.read_text()
    assert "| 800x1066, 2 | 4.00 |" in new and new != committed
    outside = lambda t: re.sub(r"<!-- BEGIN (\S+) -->.*?<!-- END \1 -->", "", t, flags=re.S)
    assert outside(new) == outside(committed)


def test_a_missing_marker_is_an_error(tables):
    with pytest.raises(ValueError, match="speed-tables"):
        tables.replace_block("no markers here\n", "speed-tables", "x")


# ---------------------------------------------------------------------------------------------
# Commands shown in the docs
# ---------------------------------------------------------------------------------------------
FENCE = re.compile(r"^```(bash|sh|console)[ \t]*\n(.*?)^```", re.S | re.M)
ENV_ASSIGN = re.compile(r"^[A-Z_][A-Z0-9_]*=")
OVERRIDE = re.compile(r"^\+{0,2}[A-Za-z_]\w*(\.\w+)+=")


def shown_commands():
    """[(file, command line)] of every fenced shell block, continuation lines joined."""
    found = []
    for path in DOC_FILES:
        with open(path) as f:
            text = f.read()
        for lang, body in FENCE.findall(text):
            lines = body.replace("\\\n", " ").splitlines()
            for line in lines:
                line = line.strip()
                if lang == "console":
                    if not line.startswith("$ "):
                        continue  # output
                    line = line[2:]
                if line and not line.startswith("#"):
                    found.append((os.path.relpath(path, REPO), line))
    return found


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def script_parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The argument parser of a repository script, built by the script's own code."""
    if script in _PARSERS:
        return _PARSERS[script]
    module = load_script(script)

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        m.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        if hasattr(module, "get_parser"):
            parser = module.get_parser()
        elif hasattr(module, "default_argument_parser"):  # train_net.py: detectron2's parser
            parser = module.default_argument_parser()
        else:
            entry = getattr(module, "parse_args", None) or module.main
            try:
                entry([]) if entry.__code__.co_argcount else entry()
            except _Captured as c:
                parser = c.parser
            else:
                raise AssertionError(f"{script} did not build an argument parser")
    _PARSERS[script] = parser
    return parser


_PARSERS = {}
_CONFIGS_CHECKED = set()


def check_python(tokens, monkeypatch) -> str:
    """'' if `python SCRIPT ...` is valid, else why not."""
    script = tokens[1]
    if not os.path.isfile(os.path.join(REPO, script)):
        return f"no script {script}"
    parser = script_parser(script, monkeypatch)
    known = parser._option_string_actions
    args = tokens[2:]
    if "--opts" in args:  # everything after --opts is key=value overrides
        cut = args.index("--opts")
        args, overrides = args[: cut + 1], args[cut + 1 :]
    else:
        overrides = [a for a in args if OVERRIDE.match(a)]
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            if flag not in known:
                return f"{script} has no flag {flag}"
    if "--config-file" in args and overrides:
        config = args[args.index("--config-file") + 1]
        key = (config, tuple(overrides))
        if key not in _CONFIGS_CHECKED:
            from smca_d2.engine.config import load_config

            try:
                load_config(
                    config if not os.path.exists(os.path.join(REPO, config)) else os.path.join(REPO, config), overrides
                )
            except Exception as e:
                return f"{config} with {overrides}: {type(e).__name__}: {e}"
            _CONFIGS_CHECKED.add(key)
    return ""


def make_targets():
    with open(os.path.join(REPO, "Makefile")) as f:
        text = f.read()
    targets = {}
    for m in re.finditer(r"^([\w-]+):[^\n=]*\n((?:\t[^\n]*\n?)*)", text, re.M):
        targets[m.group(1)] = [line.strip().lstrip("@") for line in m.group(2).splitlines()]
    return text, targets


def check_make(tokens, env, monkeypatch) -> str:
    makefile, targets = make_targets()
    with open(os.path.join(REPO, "scripts", "bootstrap.sh")) as f:
        bootstrap = f.read()
    for name in env:
        if name not in makefile and name not in bootstrap and name not in ENV_COVERED_BY:
            return f"neither the Makefile nor scripts/bootstrap.sh reads {name}"
    for target in tokens[1:] or ["install"]:
        if target not in targets:
            return f"the Makefile has no target {target}"
        for line in targets[target]:
            recipe = shlex.split(line.replace("$(VENV_PY)", "python").replace("$(PYTHON)", "python"))
            recipe = [t for t in recipe if not ENV_ASSIGN.match(t)]
            if recipe[:1] == ["python"] and recipe[1:2] != ["-m"]:
                why = check_python(recipe, monkeypatch)
                if why:
                    return f"make {target} runs `{line}`: {why}"
            elif recipe[:1] == ["bash"] and not os.path.isfile(os.path.join(REPO, recipe[1])):
                return f"make {target} runs a missing {recipe[1]}"
    return ""


def check_command(line, monkeypatch) -> str:
    """'' if the shown command is covered, else why not."""
    tokens = shlex.split(line, comments=True)
    env = [t.split("=", 1)[0] for t in tokens if ENV_ASSIGN.match(t)]
    while tokens and ENV_ASSIGN.match(tokens[0]):
        tokens = tokens[1:]
    normalized = " ".join(tokens)
    if normalized in COVERED_BY:
        return ""
    if not tokens:
        return "empty command"
    if tokens[0] == "srun" and "-c" in tokens:
        return check_command(tokens[tokens.index("-c") + 1], monkeypatch)
    if tokens[0] in ("python", "python3") and len(tokens) > 1 and tokens[1].endswith(".py"):
        return check_python(tokens, monkeypatch)
    if tokens[0] == "make":
        return check_make(tokens, env, monkeypatch)
    return "not a repository script or make target, and not in COVERED_BY"


def _test_exists(node_id: str) -> bool:
    path, _, name = node_id.partition("::")
    full = os.path.join(REPO, path)
    if not os.path.isfile(full):
        return False
    with open(full) as f:
        tree = ast.parse(f.read())
    return any(isinstance(n, ast.FunctionDef) and n.name == name.split("[")[0] for n in ast.walk(tree))


def test_docs_show_commands():
    commands = {" ".join(shlex.split(c, comments=True)) for _, c in shown_commands()}
    assert len(commands) >= 10
    assert {"make demo", "make test"} <= commands


def test_every_shown_command_is_covered(monkeypatch):
    problems = []
    for path, line in shown_commands():
        why = check_command(line, monkeypatch)
        if why:
            problems.append(f"{path}: `{line}`: {why}")
    assert not problems, "commands shown in the docs without coverage:\n" + "\n".join(problems)


def test_the_coverage_table_names_existing_tests():
    for command, node_ids in {**COVERED_BY, **ENV_COVERED_BY}.items():
        for node_id in node_ids:
            assert _test_exists(node_id), f"{command!r}: no test {node_id}"


def test_an_uncovered_command_is_named(monkeypatch):
    assert "no flag --no-such-flag" in check_command("python train_net.py --no-such-flag", monkeypatch)
    assert "no script" in check_command("python tools/no_such_tool.py --input x", monkeypatch)
    assert "no target" in check_command("make no-such-target", monkeypatch)
    assert "COVERED_BY" in check_command("curl https://example.com | sh", monkeypatch)
    why = check_command(
        "python train_net.py --config-file configs/demo/smca_r18_synthetic.py train.max_iters=5", monkeypatch
    )
    assert "train.max_iters" in why


def _anchors(path):
    with open(path) as f:
        titles = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-") for t in titles}


def test_relative_links_and_anchors_exist():
    broken = []
    for path in DOC_FILES:
        with open(path) as f:
            text = f.read()
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", link):
                continue
            target, _, anchor = link.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
            if not os.path.exists(full) or (anchor and anchor not in _anchors(full)):
                broken.append(f"{os.path.relpath(path, REPO)}: {link}")
    assert not broken, "broken links:\n" + "\n".join(broken)
