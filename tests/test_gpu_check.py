"""tools/gpu_check.sh / tools/gpu_check.py (docs/GPU.md): the dry run's table and JSON, the
install step from a carried folder, the figures and the time budget. The full dry run (every
step, the official code too where SMCA_OFFICIAL_REPO is set) is marked ``long``."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO, load_script


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("tools/gpu_check.py")


def _dry_run(tmp_path, *args, env=None):
    out = tmp_path / "out"
    cmd = ["bash", os.path.join(REPO, "tools", "gpu_check.sh"), "--dry-run", "--output", str(out)]
    cmd += ["--carry", str(tmp_path / "no_carry"), *args]
    env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    env.pop("SMCA_OFFICIAL_REPO", None)
    run = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, env=env)
    record = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    return run, record, out


def test_dry_run_prints_the_table_and_writes_the_json(tmp_path):
    """The install step's import check and the CUDA tests (collected and skipped on the CPU),
    through the shell entry point, as a device session runs it."""
    run, record, out = _dry_run(tmp_path, "--steps", "install", "cuda_tests")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert record["dry_run"] and record["complete"]
    steps = record["steps"]
    assert steps["install"]["status"] == "passed" and "no carried folder" in steps["install"]["reason"]
    assert record["environment"]["device"] == "cpu" and record["environment"]["detectron2"]
    tests = steps["cuda_tests"]
    assert tests["status"] == "passed" and tests["counts"]["tests"] >= 10
    assert tests["counts"]["skipped"] == tests["counts"]["tests"]  # no CUDA here
    assert steps["train_demo"] == {"status": "not run", "summary": "not asked for (--steps)"}
    assert "| install | passed |" in run.stdout and "| cuda_tests | passed |" in run.stdout
    assert f"{tests['counts']['tests']} skipped" in run.stdout
    assert (out / "gpu_check.md").read_text() in run.stdout
    assert "$ " in (out / "gpu_check.log").read_text()  # each command and its output


def test_a_bad_official_checkout_is_refused(tmp_path):
    run, record, _ = _dry_run(tmp_path, "--official-repo", str(tmp_path))
    assert run.returncode == 2 and "is not a checkout of SMCA-DETR (no models/detr.py)" in run.stderr
    assert record is None


def _wheel(folder, name="gpucheckdemo", version="0.1"):
    """A minimal pure-Python wheel of a module ``name`` with ``VALUE = 42``."""
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return os.path.basename(path)


def test_install_plan_takes_what_is_missing_or_excluded(gpu_check, tmp_path):
    manifest = {
        "wheels": [
            {
                "name": "gpucheckdemo",
                "version": "0.1",
                "file": "gpucheckdemo-0.1-py3-none-any.whl",
                "requirement": "gpucheckdemo",
            },
            {"name": "pytest", "version": "1.0", "file": "pytest-1.0-py3-none-any.whl", "requirement": "pytest>=7"},
            {
                "name": "setuptools",
                "version": "1",
                "file": "setuptools-1-py3-none-any.whl",
                "requirement": "setuptools<1",
            },
            {
                "name": "black",
                "version": "1",
                "file": "black-1-cp39-cp39-manylinux_2_17_x86_64.whl",
                "requirement": "black",
            },
        ],
        "detectron2": "detectron2-0.6-py3-none-any.whl",
    }
    install, kept, skipped = gpu_check.plan_install(manifest, force=False)
    assert [e["name"] for e in install] == ["gpucheckdemo", "setuptools"]  # missing; excluded version
    assert [e["name"] for e in kept] == ["pytest", "black", "detectron2"] and skipped == []
    install, kept, skipped = gpu_check.plan_install(manifest, force=True)  # a dry run
    assert [e["name"] for e in install] == ["gpucheckdemo", "pytest", "setuptools", "detectron2"]
    assert skipped == ["black-1-cp39-cp39-manylinux_2_17_x86_64.whl (for another Python)"]


def test_install_step_installs_carried_wheels_into_the_site_folder(gpu_check, tmp_path):
    carry = tmp_path / "carry"
    (carry / "wheels").mkdir(parents=True)
    file = _wheel(str(carry / "wheels"))
    manifest = {"python": "3.12", "detectron2": None, "official": None}
    manifest["wheels"] = [{"name": "gpucheckdemo", "version": "0.1", "file": file, "requirement": "gpucheckdemo"}]
    (carry / "manifest.json").write_text(json.dumps(manifest))
    args = gpu_check.parse_args(["--carry", str(carry), "--dry-run", "--output", str(tmp_path / "out")])
    work = tmp_path / "work"
    (tmp_path / "out").mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(work / "site"), REPO]))
    runner = gpu_check.Runner(str(tmp_path / "out" / "log"), env)
    open(runner.log_path, "w").close()
    ctx = gpu_check.Context(args, str(work), deadline=float("inf"), runner=runner)
    result = gpu_check.step_install(ctx)
    assert result["status"] == "passed", result
    assert result["installed"] == ["gpucheckdemo 0.1"] and result["kept"] == []
    assert "1 carried wheels installed" in result["summary"]
    assert (work / "site" / "gpucheckdemo.py").read_text() == "VALUE = 42\n"
    check = subprocess.run(
        [sys.executable, "-c", "import gpucheckdemo; print(gpucheckdemo.VALUE)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.stdout.strip() == "42"


def test_requirements_pins_and_the_detectron2_sdist(gpu_check):
    pins = gpu_check.read_pins(os.path.join(REPO, "requirements", "constraints.txt"))
    assert all(gpu_check.normalize(name) in pins for name in gpu_check.CARRIED)  # --prepare needs each
    assert not {"torch", "torchvision"} & {gpu_check.normalize(n) for n in gpu_check.CARRIED}
    requirements = gpu_check.read_requirements(os.path.join(REPO, "requirements", "base.txt"))
    assert requirements["setuptools"] == "setuptools<81" and requirements["fvcore"] == "fvcore>=0.1.5,<0.1.6"
    requirement, digest = gpu_check.detectron2_sdist_pin()
    assert requirement == "pb1-detectron2==0.6" and len(digest) == 64


def _speed_reports():
    ours = lambda s, **more: {"s_per_image": s, "peak_mem_mib": 1000.0, **more}
    single = {
        "inference": [{"size": [800, 1333], "amp": False, "ours": ours(0.05), "official": ours(0.1)}],
        "train": [
            {
                "size": [800, 1333],
                "batch": 2,
                "amp": True,
                "ours": {"s_per_iter": 0.25, "peak_mem_mib": 900.0},
                "official": {"s_per_iter": 0.5, "peak_mem_mib": 1800.0},
            }
        ],
        "max_batch": [
            {
                "size": [800, 1333],
                "amp": False,
                "ours": {"batch": 40, "limit": "memory", "s_per_iter": 4.0, "images_per_s": 10.0, "peak_mem_mib": 9e4},
                "official": {"batch": None, "limit": "batch 2 does not fit"},
            }
        ],
        "equal_outputs": {},
    }
    others = [
        {
            "model": "detr_baseline",
            "amp": False,
            "inference": {"800x1333": ours(0.04)},
            "train": {"s_per_iter": 0.2, "peak_mem_mib": 800.0},
        }
    ]
    return {"speed_single_scale": {"single_scale": single}, "speed_other_models": {"other_models": others}}


def test_figures_and_table_from_the_speed_reports(gpu_check):
    rows = {r["what"]: r for r in gpu_check.figures(_speed_reports())}
    row = rows["single-scale 800x1333 inference fp32"]
    assert row["unit"] == "images/s" and row["ours"] == 20.0 and row["official"] == 10.0
    assert rows["single-scale 800x1333 train batch 2 AMP"]["ours"] == 4.0
    assert rows["single-scale 800x1333 train batch 2 AMP peak memory"]["official"] == 1800.0
    assert (
        rows["single-scale largest batch fp32"]["ours"] == 40
        and rows["single-scale largest batch fp32"]["official"] is None
    )
    assert rows["DETR baseline 800x1333 inference fp32"] == {
        "what": "DETR baseline 800x1333 inference fp32",
        "unit": "images/s",
        "ours": 25.0,
        "official": None,
        "higher_is_better": True,
    }
    record = {
        "dry_run": False,
        "started": "2026-12-01T12:00:00",
        "environment": {"device": "NVIDIA H200", "torch": "2.11", "python": "3.12.3", "detectron2": "0.6"},
        "steps": {"install": {"status": "passed", "seconds": 5.0, "summary": "ok"}},
        "figures": list(rows.values()),
    }
    table = gpu_check.render_table(record)
    assert "NVIDIA H200, torch 2.11, Python 3.12.3" in table and "| install | passed | 5 | ok |" in table
    assert "| single-scale 800x1333 inference fp32 | images/s | 20 | 10 | 2.00x |" in table
    assert "| single-scale largest batch fp32 | images | 40 | - | - |" in table


def test_steps_out_of_time_are_reported_not_run(gpu_check, tmp_path, monkeypatch):
    calls = []

    def step(ctx):
        calls.append(ctx.remaining(1000))
        return {"status": "passed", "summary": "done"}

    monkeypatch.setattr(gpu_check, "STEP_FUNCTIONS", dict.fromkeys(gpu_check.STEPS, step))
    monkeypatch.setattr(gpu_check, "MIN_STEP_SECONDS", 5)
    args = gpu_check.parse_args(["--output", str(tmp_path), "--time-budget", "3", "--steps", "install", "train_demo"])
    record = gpu_check.check(args)
    assert calls == []  # 3 s are less than a step needs
    assert record["steps"]["install"] == {"status": "not run", "summary": "out of time (3 s left)"}
    assert record["steps"]["cuda_tests"]["summary"] == "not asked for (--steps)"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["complete"]
    assert gpu_check.main(["--output", str(tmp_path), "--time-budget", "3"]) == 1  # nothing passed


@pytest.mark.long
def test_full_dry_run(tmp_path):
    """Every step on the CPU at tiny sizes, the official code too where SMCA_OFFICIAL_REPO names a
    checkout (minutes on 2 cores)."""
    official = os.environ.get("SMCA_OFFICIAL_REPO")
    run, record, out = _dry_run(tmp_path, *(["--official-repo", official] if official else []))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    steps = record["steps"]
    assert all(steps[name]["status"] == "passed" for name in steps), steps
    assert steps["train_demo"]["iterations"] == 3 and steps["train_demo"]["ap"] >= 0
    single = json.loads((out / "speed_single_scale.json").read_text())
    assert single["complete"] and single["single_scale"]["max_batch"][0]["ours"]["batch"] == 3
    assert single["official"] is bool(official)
    if official:
        assert steps["speed_single_scale"]["equal_outputs"] and "EQUAL" in steps["speed_single_scale"]["summary"]
    others = json.loads((out / "speed_other_models.json").read_text())
    assert [r["model"] for r in others["other_models"]] == ["smca_multi_scale", "detr_baseline"]
    assert "| single-scale 64x64 inference fp32 | images/s |" in run.stdout
    assert "| multi-scale largest batch fp32 | images | 3 |" in run.stdout
