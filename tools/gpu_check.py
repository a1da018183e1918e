#!/usr/bin/env python
"""The GPU check (docs/GPU.md): one command for a machine with CUDA torch and torchvision and no
package registry. It makes the project importable from carried files, runs the CUDA tests, the
speed benchmark and a short training of the demo config, then prints one table and writes JSON.

    python tools/gpu_check.py --prepare --official-repo /path/to/SMCA-DETR   # here (registry)
    bash tools/gpu_check.sh --output DIR                                     # the GPU machine
    bash tools/gpu_check.sh --dry-run                                        # the CPU: plumbing

``--prepare`` fills the carried folder (``--carry``, default ``.gpu_carry/``, ignored by git):
``wheels/`` holds detectron2 v0.6 as a pure-Python wheel built from the registry's sdist (sha256
checked) and the wheels, for Python 3.12, of the requirements a GPU machine may lack (the versions
of requirements/constraints.txt); ``official/`` a copy of a checkout of the official SMCA-DETR code
(``--official-repo`` or ``$SMCA_OFFICIAL_REPO``; optional, never committed); ``manifest.json``
what is there. torch and torchvision are never carried: the GPU machine has its own. The size is
printed and must stay under :data:`CARRY_LIMIT_MIB`.

The check runs these steps in order, each in its own processes and time limit, all within
``--time-budget`` seconds; a step that no longer fits is reported as not run:

1. ``install``: the carried wheels that this Python lacks (or has at a version the requirements
   exclude) into a site folder (``pip install --no-index --target``), detectron2 only if none is
   installed; then ``import smca_d2, detectron2`` with that folder and the repository first on
   ``PYTHONPATH`` (as every later step runs), and the versions and the GPU are recorded;
2. ``cuda_tests``: ``pytest tests/cuda -m cuda`` (skipped without CUDA: in a dry run they are
   collected and reported as skipped);
3. ``speed_single_scale``: ``benchmarks/speed.py``, single-scale R50 at 800x1333, ours and the
   official code with the same converted weights: outputs of every decoder layer checked equal,
   inference fp32 and AMP, training at batch 2 and at the largest batch that fits, peak memory;
4. ``train_demo``: ``datasets/prepare_synthetic.py`` and ``train_net.py`` of
   configs/demo/smca_r18_synthetic.py for 200 iterations on CUDA, evaluated (COCO AP);
5. ``speed_other_models``: ``benchmarks/speed.py`` for the multi-scale R50 and the DETR baseline
   (ours only), the same figures.

``--dry-run`` runs all of it on the CPU at tiny sizes (64x64 images, one timed repetition, a few
training iterations): the plumbing, not the figures. Without a carried folder the install step
only checks the imports; with one it installs every carried wheel this Python can take into a
temporary site folder, which the later steps then use, as on the GPU machine.

Writes ``gpu_check.json`` (every step's result, the figures, the environment), ``gpu_check.md``
(the table), ``gpu_check.log`` (every command's output) and the speed benchmark's JSON and PNG
files into ``--output``. Only the standard library is imported here: the steps run in
subprocesses with the interpreter running this script.
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CARRY = os.path.join(REPO, ".gpu_carry")
# Everything that travels to the device machine (the working tree included) is limited to 64 MiB.
CARRY_LIMIT_MIB = 48
PYTHON_VERSION = "3.12"  # the GPU machines' Python
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# The requirements (requirements/base.txt, test.txt) and their dependencies that are carried, at
# the versions of requirements/constraints.txt. numpy, scipy, Pillow, matplotlib, OpenCV and
# tensorboard are large binaries that the GPU machines have; the install step checks for them.
CARRIED = [
    "setuptools",
    "wheel",
    "pycocotools",
    "fvcore",
    "iopath",
    "omegaconf",
    "hydra-core",
    "antlr4-python3-runtime",
    "PyYAML",
    "portalocker",
    "termcolor",
    "yacs",
    "tabulate",
    "cloudpickle",
    "tqdm",
    "typing_extensions",
    "packaging",
    "black",
    "click",
    "mypy_extensions",
    "pathspec",
    "platformdirs",
    "pytokens",
    "pytest",
    "pluggy",
    "iniconfig",
    "Pygments",
]
# Modules the steps import that are not carried: (module, distribution).
NOT_CARRIED = [
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("PIL", "Pillow"),
    ("matplotlib", "matplotlib"),
    ("cv2", "opencv-python-headless"),
    ("tensorboard", "tensorboard"),
]
STEPS = ["install", "cuda_tests", "speed_single_scale", "train_demo", "speed_other_models"]
# Longest time of each step on the GPU machine (seconds); the run's budget can cut it shorter.
STEP_LIMITS = {
    "install": 90,
    "cuda_tests": 150,
    "speed_single_scale": 220,
    "train_demo": 120,
    "speed_other_models": 180,
}
MIN_STEP_SECONDS = 20  # a step with less time left is not started
DEMO_CONFIG = "configs/demo/smca_r18_synthetic.py"
DEMO_ITERATIONS = 200


def log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="fill the carried folder (needs the package registry)")
    mode.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes (no GPU needed)")
    add("--carry", default=DEFAULT_CARRY, help="the carried folder (default: .gpu_carry/ of the repository)")
    add(
        "--official-repo",
        default=None,
        help="a checkout of gaopengcuhk/SMCA-DETR (default: $SMCA_OFFICIAL_REPO; for the check, else "
        "the carried copy CARRY/official)",
    )
    add("--output", default=os.path.join(REPO, "output", "gpu_check"), help="folder of the table, JSON and log")
    add("--work-dir", default=None, help="folder for the site packages, data and training runs (default: temporary)")
    add(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for all steps (default: 420 on the GPU, 1800 for a dry run)",
    )
    add("--steps", nargs="+", choices=STEPS, default=STEPS, metavar="STEP", help="steps to run: " + ", ".join(STEPS))
    return parser


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.time_budget is None:
        args.time_budget = 1800.0 if args.dry_run else 420.0
    if args.time_budget <= 0:
        parser.error(f"--time-budget {args.time_budget}: expected a positive number of seconds")
    if args.official_repo is None:
        args.official_repo = os.environ.get("SMCA_OFFICIAL_REPO") or None
    if args.official_repo and not os.path.isfile(os.path.join(args.official_repo, "models", "detr.py")):
        parser.error(f"--official-repo {args.official_repo!r} is not a checkout of SMCA-DETR (no models/detr.py)")
    args.steps = [s for s in STEPS if s in args.steps]
    return args


# ---------------------------------------------------------------------------------------------
# --prepare (here, where the registry is reachable)
# ---------------------------------------------------------------------------------------------
def read_pins(path: str) -> Dict[str, str]:
    """``name -> version`` of a pip constraints file (names lower case, ``_`` as ``-``)."""
    pins = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#;]+)", line.strip())
            if m:
                pins[normalize(m.group(1))] = m.group(2)
    return pins


def read_requirements(*paths: str) -> Dict[str, str]:
    """``name -> requirement string`` (e.g. ``setuptools<81``) of requirements files."""
    found = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                text = line.split("#", 1)[0].strip()
                m = re.match(r"^([A-Za-z0-9_.-]+)", text)
                if m:
                    found[normalize(m.group(1))] = text.replace(" ", "")
    return found


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def detectron2_sdist_pin() -> tuple:
    """(requirement, sha256) of detectron2's sdist, as scripts/bootstrap.sh installs it."""
    with open(os.path.join(REPO, "scripts", "bootstrap.sh")) as f:
        text = f.read()
    requirement = re.search(r'^D2_SDIST="([^"]+)"', text, re.M).group(1)
    digest = re.search(r'^D2_SHA256="([0-9a-f]{64})"', text, re.M).group(1)
    return requirement, digest


def _pip(*args: str, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def _new_files(folder: str, before: set) -> List[str]:
    return sorted(set(os.listdir(folder)) - before)


def fetch_wheel(name: str, version: str, wheels: str) -> str:
    """A wheel of ``name==version`` for the GPU machines' Python into ``wheels``: a binary one
    from the registry, or one built here from the sdist, which must then be pure Python."""
    before = set(os.listdir(wheels))
    platform_args = [a for p in PLATFORMS + ["any"] for a in ("--platform", p)]
    abi = "cp" + PYTHON_VERSION.replace(".", "")
    got = _pip(
        "download",
        "--only-binary=:all:",
        "--no-deps",
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--abi",
        abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
        *platform_args,
        "-d",
        wheels,
        f"{name}=={version}",
    )
    if got.returncode != 0:  # no wheel on the registry (fvcore, antlr4): build one from the sdist
        got = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", wheels, f"{name}=={version}")
        built = _new_files(wheels, before)
        if got.returncode == 0 and built and not all(f.endswith("-none-any.whl") for f in built):
            raise RuntimeError(
                f"{name}=={version}: no wheel for Python {PYTHON_VERSION}, and {built} is not pure Python"
            )
    new = _new_files(wheels, before)
    if got.returncode != 0 or not new:
        raise RuntimeError(f"could not get a wheel of {name}=={version}:\n{got.stderr[-2000:]}")
    return new[0]


# detectron2's Python package only (its C++ extension is not built): what scripts/bootstrap.sh
# installs from the same sdist.
_PURE_SETUP = """from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="0.6",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    include_package_data=False,
)
"""


def build_detectron2_wheel(wheels: str) -> str:
    """detectron2 v0.6 as a pure-Python wheel, from the registry's sdist (sha256 checked)."""
    requirement, digest = detectron2_sdist_pin()
    with tempfile.TemporaryDirectory() as tmp:
        got = _pip("download", "--no-deps", "--no-build-isolation", "-d", tmp, requirement)
        archives = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        if got.returncode != 0 or not archives:
            raise RuntimeError(f"could not download {requirement}:\n{got.stderr[-2000:]}")
        archive = os.path.join(tmp, archives[0])
        with open(archive, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise RuntimeError(f"sha256 of {archives[0]} is not the {digest} of scripts/bootstrap.sh")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
        (src,) = [os.path.join(tmp, d) for d in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, d))]
        for name in ("setup.py", "setup.cfg", "pyproject.toml"):
            if os.path.exists(os.path.join(src, name)):
                os.remove(os.path.join(src, name))
        with open(os.path.join(src, "setup.py"), "w") as f:
            f.write(_PURE_SETUP)
        before = set(os.listdir(wheels))
        got = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src)
        new = _new_files(wheels, before)
        if got.returncode != 0 or not new:
            raise RuntimeError(f"could not build detectron2's wheel:\n{got.stderr[-2000:]}")
        return new[0]


def folder_mib(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def prepare(carry: str, official_repo: Optional[str]) -> dict:
    """Fill ``carry`` (see the module's docstring); returns the manifest."""
    pins = read_pins(os.path.join(REPO, "requirements", "constraints.txt"))
    requirements = read_requirements(
        os.path.join(REPO, "requirements", "base.txt"), os.path.join(REPO, "requirements", "test.txt")
    )
    missing = [n for n in CARRIED if normalize(n) not in pins]
    if missing:
        raise RuntimeError(f"requirements/constraints.txt pins no version of {missing}")
    if os.path.isdir(carry):
        shutil.rmtree(carry)
    wheels = os.path.join(carry, "wheels")
    os.makedirs(wheels)
    manifest = {
        "made": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": PYTHON_VERSION,
        "wheels": [],
        "detectron2": None,
        "official": None,
    }
    for name in CARRIED:
        version = pins[normalize(name)]
        file = fetch_wheel(name, version, wheels)
        manifest["wheels"].append(
            {"name": name, "version": version, "file": file, "requirement": requirements.get(normalize(name), name)}
        )
        log(f"carried {file}")
    manifest["detectron2"] = build_detectron2_wheel(wheels)
    log(f"carried {manifest['detectron2']} (detectron2 v0.6, pure Python)")
    if official_repo:
        shutil.copytree(
            official_repo,
            os.path.join(carry, "official"),
            ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"),
        )
        manifest["official"] = "official"
        log("carried a copy of the official SMCA-DETR checkout as official/")
    else:
        log(
            "no official SMCA-DETR checkout given (--official-repo or $SMCA_OFFICIAL_REPO): the check will run ours only"
        )
    with open(os.path.join(carry, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    size = folder_mib(carry)
    manifest["size_mib"] = size
    log(f"{os.path.relpath(carry, REPO) if carry.startswith(REPO) else carry}: {size:.1f} MiB")
    if size > CARRY_LIMIT_MIB:
        raise RuntimeError(f"the carried folder is {size:.1f} MiB, over the {CARRY_LIMIT_MIB} MiB it may take")
    return manifest


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------
class Runner:
    """Runs the commands of the steps with the check's environment, time limits and log."""

    def __init__(self, log_path: str, env: dict):
        self.log_path, self.env = log_path, env

    def run(self, cmd: List[str], timeout: float, cwd: str = REPO, env: Optional[dict] = None) -> dict:
        """Run ``cmd``; its output goes to the log. On timeout its whole process group is ended
        (the speed benchmark's workers with it). Returns rc, seconds, timed_out and the output's tail."""
        start = time.perf_counter()
        with open(self.log_path, "a") as logf:
            logf.write(f"\n$ {' '.join(cmd)}\n")
            logf.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env={**self.env, **(env or {})},
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            timed_out = False
            try:
                rc = proc.wait(timeout=None if timeout == float("inf") else max(timeout, 1))
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            logf.write(f"[exit {rc}{', time limit reached' if timed_out else ''}]\n")
        seconds = time.perf_counter() - start
        return {"rc": rc, "seconds": seconds, "timed_out": timed_out, "tail": self.tail()}

    def tail(self, lines: int = 25) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-lines:])


def _wheel_fits_this_python(file: str) -> bool:
    """Whether this interpreter can install the wheel ``file`` (its Python tag)."""
    python_tag = file[: -len(".whl")].split("-")[-3]
    here = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    return all(not t.startswith("cp") or t == here for t in python_tag.split("."))


def _satisfied(name: str, requirement: str) -> bool:
    """Whether this interpreter has the distribution ``name`` at a version ``requirement`` allows."""
    from importlib import metadata

    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return True
    try:
        return Requirement(requirement).specifier.contains(version, prereleases=True)
    except Exception:
        return True


def plan_install(manifest: dict, force: bool) -> tuple:
    """(wheels to install, distributions kept as installed, wheels skipped with why)."""
    install, kept, skipped = [], [], []
    entries = [*manifest["wheels"]]
    if manifest.get("detectron2"):
        entries.append({"name": "detectron2", "file": manifest["detectron2"], "requirement": "detectron2"})
    for entry in entries:
        if force:
            if _wheel_fits_this_python(entry["file"]):
                install.append(entry)
            else:
                skipped.append(f"{entry['file']} (for another Python)")
        elif entry["name"] == "detectron2":
            import importlib.util

            (kept if importlib.util.find_spec("detectron2") else install).append(entry)
        elif _satisfied(entry["name"], entry["requirement"]):
            kept.append(entry)
        else:
            install.append(entry)
    return install, kept, skipped


# What the install step imports and records (run with the check's PYTHONPATH).
_VERIFY = r"""
import importlib, json, os, platform, sys
missing = []
for module, dist in %(not_carried)r:
    try:
        importlib.import_module(module)
    except Exception as e:
        missing.append(f"{dist} ({module}: {type(e).__name__}: {e})")
if missing:
    sys.exit("not installed here, and not carried: " + "; ".join(missing))
import torch, torchvision
import smca_d2
import detectron2, fvcore, iopath, omegaconf, hydra, pycocotools.coco
from detectron2 import model_zoo  # pkg_resources
import smca_d2.modeling
from smca_d2.compat import HAS_C as extension  # (smca_d2 stands in for a missing detectron2._C)
cuda = torch.cuda.is_available()
print("GPU_CHECK_ENV " + json.dumps({
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "cuda": torch.version.cuda,
    "cuda_available": cuda,
    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    "detectron2": detectron2.__version__,
    "detectron2_extension": extension,
    "detectron2_from": "carried" if os.environ.get("GPU_CHECK_SITE") and detectron2.__file__.startswith(os.environ["GPU_CHECK_SITE"]) else "installed",
    "smca_d2": smca_d2.__version__,
    "machine": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
}))
"""


def step_install(ctx) -> dict:
    carry, site = ctx.args.carry, ctx.site
    manifest_path = os.path.join(carry, "manifest.json")
    result: dict = {}
    notes = []
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        result["carry_mib"] = folder_mib(carry)
        install, kept, skipped = plan_install(manifest, force=ctx.args.dry_run)
        result.update(
            installed=[f"{e['name']} {e.get('version', '')}".strip() for e in install],
            kept=[e["name"] for e in kept],
            skipped=skipped,
        )
        if install:
            os.makedirs(site, exist_ok=True)
            files = [os.path.join(carry, "wheels", e["file"]) for e in install]
            cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile"]
            cmd += ["--no-cache-dir", "--disable-pip-version-check", "--target", site, *files]
            got = ctx.runner.run(cmd, timeout=ctx.remaining(STEP_LIMITS["install"]))
            if got["rc"] != 0:
                return {**result, "status": "failed", "summary": "pip could not install the carried wheels"}
        notes.append(
            f"{len(install)} carried wheels installed, {len(kept)} already here ({result['carry_mib']:.1f} MiB carried)"
        )
        if skipped:
            notes.append(f"{len(skipped)} for Python {manifest['python']} only")
    else:
        result["reason"] = f"no carried folder {carry} (made by --prepare where the registry is reachable)"
        notes.append("nothing carried: this Python's own packages")
    got = ctx.runner.run(
        [sys.executable, "-c", _VERIFY % {"not_carried": NOT_CARRIED}],
        timeout=ctx.remaining(STEP_LIMITS["install"]),
        env={"GPU_CHECK_SITE": site},
    )
    envs = [line for line in got["tail"].splitlines() if line.startswith("GPU_CHECK_ENV ")]
    if got["rc"] != 0 or not envs:
        return {**result, "status": "failed", "summary": "the project does not import: " + _last_line(got["tail"])}
    ctx.environment.update(json.loads(envs[-1][len("GPU_CHECK_ENV ") :]))
    env = ctx.environment
    if not ctx.args.dry_run and not env["cuda_available"]:
        return {**result, "status": "failed", "summary": "torch sees no CUDA device (on a CPU machine: --dry-run)"}
    notes.append(
        f"detectron2 {env['detectron2']} ({env['detectron2_from']}"
        + (", with its C++ extension" if env["detectron2_extension"] else ", pure Python")
        + f"), torch {env['torch']}"
    )
    return {**result, "status": "passed", "summary": "; ".join(notes)}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("[exit")]
    return lines[-1][-300:] if lines else "(no output)"


def step_cuda_tests(ctx) -> dict:
    xml = os.path.join(ctx.work, "cuda_tests.xml")
    cmd = [sys.executable, "-m", "pytest", "tests/cuda", "-m", "cuda", "-q", "-rs", "--junitxml", xml]
    got = ctx.runner.run(cmd, timeout=ctx.remaining(STEP_LIMITS["cuda_tests"]))
    if got["timed_out"]:
        return {"status": "timeout", "summary": "pytest ran past its time limit"}
    if not os.path.isfile(xml):
        return {"status": "failed", "summary": "pytest wrote no report: " + _last_line(got["tail"])}
    counts, failures = junit_counts(xml)
    summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if not ctx.args.dry_run and counts["skipped"]:
        summary += " (skipped on a GPU machine)"
    if counts["tests"] == 0:
        return {"status": "failed", "summary": "no CUDA test was collected", "counts": counts}
    ok = got["rc"] == 0 and counts["failed"] == 0 and (ctx.args.dry_run or counts["skipped"] == 0)
    return {"status": "passed" if ok else "failed", "summary": summary, "counts": counts, "failures": failures}


def junit_counts(path: str) -> tuple:
    """({tests, passed, failed, skipped}, [{test, message}]) of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failures.append(
                {"test": f"{case.get('classname')}.{case.get('name')}", "message": (bad.get("message") or "")[:500]}
            )
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


def official_repo(ctx) -> tuple:
    """(the official checkout for the speed benchmark or None, why none)."""
    carried = os.path.join(ctx.args.carry, "official")
    for path in (ctx.args.official_repo, carried):
        if path and os.path.isfile(os.path.join(path, "models", "detr.py")):
            return path, ""
    return None, f"no official checkout (none carried in {carried}, no --official-repo or $SMCA_OFFICIAL_REPO)"


def speed_command(ctx, models: List[str], output: str, official: Optional[str]) -> List[str]:
    cmd = [sys.executable, "benchmarks/speed.py", "--models", *models, "--skip", "profile", "scaling"]
    cmd += ["--inference-rounds", "1", "--train-rounds", "1", "--max-batch", "--output", output]
    if ctx.args.dry_run:
        cmd += ["--device", "cpu", "--sizes", "64x64", "--train-size", "64x64", "--threads", "2"]
        cmd += ["--warmup", "0", "--repeats", "1", "--train-warmup", "0", "--max-batch-cap", "3"]
    else:
        cmd += ["--device", "cuda", "--amp", "--sizes", "800x1333", "--train-size", "800x1333"]
        cmd += ["--warmup", "2", "--repeats", "5", "--train-warmup", "2"]
    if "smca_single_scale" in models:
        cmd += ["--variants", "ours", "official"]
        if official:
            cmd += ["--official-repo", official]
    return cmd


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _speed_step(ctx, name: str, models: List[str]) -> dict:
    output = os.path.join(ctx.args.output, f"{name}.json")
    if os.path.exists(output):
        os.remove(output)
    official, why = official_repo(ctx) if "smca_single_scale" in models else (None, "")
    got = ctx.runner.run(speed_command(ctx, models, output, official), timeout=ctx.remaining(STEP_LIMITS[name]))
    report = _read_json(output)
    result = {"json": os.path.basename(output), "official": bool(official)}
    if why:
        result["official_reason"] = why
    if report is not None:
        ctx.speed[name] = report
    if got["timed_out"]:
        status, summary = "timeout", "ran past its time limit" + (" (partial results kept)" if report else "")
    elif got["rc"] != 0 or report is None:
        status, summary = "failed", "benchmarks/speed.py failed: " + _last_line(got["tail"])
    else:
        status, summary = "passed", "complete"
    if report is not None and "smca_single_scale" in models:
        equal = (report.get("single_scale") or {}).get("equal_outputs") or {}
        result["equal_outputs"] = equal
        if equal:
            worst = max(max(d["max_abs_logits"], d["max_abs_boxes"]) for d in equal.values())
            same = all(d["pass"] for d in equal.values())
            summary = (
                f"outputs ours vs official {'EQUAL' if same else 'DIFFERENT'} (max abs difference {worst:.1e}); "
                + summary
            )
            if not same and status == "passed":
                status = "failed"
        elif not official:
            summary = f"ours only: {why}; " + summary
    return {"status": status, "summary": summary, **result}


def step_speed_single_scale(ctx) -> dict:
    return _speed_step(ctx, "speed_single_scale", ["smca_single_scale"])


def step_speed_other_models(ctx) -> dict:
    return _speed_step(ctx, "speed_other_models", ["smca_multi_scale", "detr_baseline"])


def step_train_demo(ctx) -> dict:
    data = os.path.join(ctx.work, "data")
    out = os.path.join(ctx.work, "train_demo")
    shutil.rmtree(out, ignore_errors=True)
    dry = ctx.args.dry_run
    iterations = 3 if dry else DEMO_ITERATIONS
    prepare_cmd = [sys.executable, "datasets/prepare_synthetic.py", "--output", os.path.join(data, "synthetic")]
    # One pass over the training images: the 200 iterations of 8 images see each once.
    prepare_cmd += ["--num-train", "16", "--num-val", "4"] if dry else ["--num-train", "1600", "--num-val", "100"]
    got = ctx.runner.run(prepare_cmd, timeout=ctx.remaining(STEP_LIMITS["train_demo"]))
    if got["rc"] != 0:
        return {"status": "failed", "summary": "datasets/prepare_synthetic.py failed: " + _last_line(got["tail"])}
    # The demo config's evaluation period is set for its own length: evaluate once, at the end.
    cmd = [sys.executable, "train_net.py", "--config-file", DEMO_CONFIG, "--num-gpus", "1"]
    cmd += [f"train.max_iter={iterations}", f"train.eval_period={iterations}", f"train.output_dir={out}"]
    cmd += ["train.device=cpu" if dry else "train.device=cuda"]
    if dry:
        cmd += [
            "dataloader.train.total_batch_size=2",
            "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0",
        ]
        cmd += ["train.log_period=1"]
    got = ctx.runner.run(cmd, timeout=ctx.remaining(STEP_LIMITS["train_demo"]), env={"DETECTRON2_DATASETS": data})
    metrics = read_metrics(os.path.join(out, "metrics.json"))
    result = {
        "iterations": iterations,
        "device": "cpu" if dry else "cuda",
        **metrics,
        "train_net_seconds": got["seconds"],
    }
    if got["timed_out"]:
        return {"status": "timeout", "summary": "train_net.py ran past its time limit", **result}
    if got["rc"] != 0 or "ap" not in metrics:
        return {"status": "failed", "summary": "train_net.py failed: " + _last_line(got["tail"]), **result}
    summary = f"{iterations} iterations on {result['device']}, AP {metrics['ap']:.1f} (AP50 {metrics.get('ap50', float('nan')):.1f})"
    if metrics.get("s_per_iter"):
        summary += f", {metrics['s_per_iter']:.3f} s/iter"
    return {"status": "passed", "summary": summary, **result}


def read_metrics(path: str) -> dict:
    """The last evaluation (bbox AP, AP50), the last logged time per iteration and total loss of a
    detectron2 metrics.json."""
    found: dict = {}
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return found
    for record in records:
        if "bbox/AP" in record:
            found["ap"], found["ap50"] = record["bbox/AP"], record.get("bbox/AP50")
        if "time" in record:
            found["s_per_iter"] = record["time"]
        if "total_loss" in record:
            found["total_loss"], found["last_logged_iteration"] = record["total_loss"], record.get("iteration")
    return found


STEP_FUNCTIONS = {
    "install": step_install,
    "cuda_tests": step_cuda_tests,
    "speed_single_scale": step_speed_single_scale,
    "train_demo": step_train_demo,
    "speed_other_models": step_speed_other_models,
}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
def _per_second(seconds: Optional[float]) -> Optional[float]:
    return 1.0 / seconds if seconds else None


def figures(speed: Dict[str, dict]) -> List[dict]:
    """The figures of the speed reports, one row each: what, unit, ours, official (or None) and
    whether more is better."""
    rows = []

    def add(what, unit, ours, official=None, higher_is_better=True):
        if ours is not None or official is not None:
            rows.append(
                {"what": what, "unit": unit, "ours": ours, "official": official, "higher_is_better": higher_is_better}
            )

    single = (speed.get("speed_single_scale") or {}).get("single_scale") or {}
    for row in single.get("inference", []):
        size, prec = f"{row['size'][0]}x{row['size'][1]}", "AMP" if row["amp"] else "fp32"
        o, f = row.get("ours") or {}, row.get("official") or {}
        add(
            f"single-scale {size} inference {prec}",
            "images/s",
            _per_second(o.get("s_per_image")),
            _per_second(f.get("s_per_image")),
        )
        add(
            f"single-scale {size} inference {prec} peak memory",
            "MiB",
            o.get("peak_mem_mib"),
            f.get("peak_mem_mib"),
            False,
        )
    for row in single.get("train", []):
        size, prec = f"{row['size'][0]}x{row['size'][1]}", "AMP" if row["amp"] else "fp32"
        o, f = row.get("ours") or {}, row.get("official") or {}
        what = f"single-scale {size} train batch {row['batch']} {prec}"
        add(what, "it/s", _per_second(o.get("s_per_iter")), _per_second(f.get("s_per_iter")))
        add(what + " peak memory", "MiB", o.get("peak_mem_mib"), f.get("peak_mem_mib"), False)
    for row in single.get("max_batch", []):
        rows.extend(_max_batch_figures("single-scale", row, row.get("ours"), row.get("official")))
    for row in (speed.get("speed_other_models") or {}).get("other_models", []):
        name = {"smca_multi_scale": "multi-scale", "detr_baseline": "DETR baseline"}.get(row["model"], row["model"])
        prec = "AMP" if row["amp"] else "fp32"
        for size, result in row.get("inference", {}).items():
            add(f"{name} {size} inference {prec}", "images/s", _per_second(result.get("s_per_image")))
            add(f"{name} {size} inference {prec} peak memory", "MiB", result.get("peak_mem_mib"), None, False)
        if row.get("train"):
            add(f"{name} train batch 2 {prec}", "it/s", _per_second(row["train"].get("s_per_iter")))
            add(f"{name} train batch 2 {prec} peak memory", "MiB", row["train"].get("peak_mem_mib"), None, False)
        if row.get("max_batch"):
            rows.extend(_max_batch_figures(name, row, row["max_batch"], None))
    return rows


def _max_batch_figures(name: str, row: dict, ours: Optional[dict], official: Optional[dict]) -> List[dict]:
    prec = "AMP" if row["amp"] else "fp32"
    ours, official = ours or {}, official or {}
    get = lambda r, k: r.get(k) if r.get("batch") is not None else None
    out = []
    for what, key, unit, higher in (
        ("largest batch", "batch", "images", True),
        ("train at the largest batch", "images_per_s", "images/s", True),
        ("train at the largest batch, peak memory", "peak_mem_mib", "MiB", False),
    ):
        o, f = get(ours, key), get(official, key)
        if o is not None or f is not None:
            out.append(
                {"what": f"{name} {what} {prec}", "unit": unit, "ours": o, "official": f, "higher_is_better": higher}
            )
    return out


def _number(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def render_table(record: dict) -> str:
    """The check's table (Markdown): the steps, then the figures."""
    env = record["environment"]
    lines = [
        f"GPU check{' (dry run: CPU, tiny sizes; the figures are not measurements)' if record['dry_run'] else ''}, "
        f"{record['started'][:19]}: {env.get('device', '?')}, torch {env.get('torch', '?')}, "
        f"Python {env.get('python', '?')}, detectron2 {env.get('detectron2', '?')}",
        "",
        "| step | status | seconds | result |",
        "|---|---|---|---|",
    ]
    for name in STEPS:
        step = record["steps"].get(name)
        if step is None:
            continue
        seconds = f"{step['seconds']:.0f}" if step.get("seconds") is not None else "-"
        lines.append(f"| {name} | {step['status']} | {seconds} | {step.get('summary', '').replace('|', '/')} |")
    rows = record.get("figures") or []
    if rows:
        lines += ["", "| figure | unit | ours | official | ours / official |", "|---|---|---|---|---|"]
        for r in rows:
            ratio = f"{r['ours'] / r['official']:.2f}x" if r["ours"] and r["official"] else "-"
            lines.append(f"| {r['what']} | {r['unit']} | {_number(r['ours'])} | {_number(r['official'])} | {ratio} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------
class Context:
    def __init__(self, args, work: str, deadline: float, runner: Runner):
        self.args, self.work, self.deadline, self.runner = args, work, deadline, runner
        self.site = os.path.join(work, "site")
        self.environment: dict = {}
        self.speed: Dict[str, dict] = {}

    def remaining(self, limit: float) -> float:
        """The time a command of a step may take: the step's limit on the GPU, at most what is left."""
        left = self.deadline - time.monotonic()
        return left if self.args.dry_run else min(limit, left)


def check(args) -> dict:
    os.makedirs(args.output, exist_ok=True)
    work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    log_path = os.path.join(args.output, "gpu_check.log")
    open(log_path, "w").close()
    site = os.path.join(work, "site")
    shutil.rmtree(site, ignore_errors=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The carried packages first (when installed), then the repository: smca_d2 and its configs
    # import from the source tree, as after `pip install -e .`.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, REPO, os.environ.get("PYTHONPATH")) if p)
    env.pop("SMCA_OFFICIAL_REPO", None)  # the benchmark gets the checkout on its command line
    start = time.monotonic()
    ctx = Context(args, work, start + args.time_budget, Runner(log_path, env))
    record = {
        "dry_run": args.dry_run,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "time_budget_s": args.time_budget,
        "steps_asked": args.steps,
        "environment": ctx.environment,
        "steps": {},
        "figures": [],
        "complete": False,
    }
    log(f"{'dry run (CPU) ' if args.dry_run else ''}steps {', '.join(args.steps)}; {args.time_budget:.0f} s in all")
    failed_install = False
    for name in STEPS:
        if name not in args.steps:
            record["steps"][name] = {"status": "not run", "summary": "not asked for (--steps)"}
            continue
        left = ctx.deadline - time.monotonic()
        if failed_install:
            record["steps"][name] = {"status": "not run", "summary": "the install step failed"}
            continue
        if left < MIN_STEP_SECONDS:
            record["steps"][name] = {"status": "not run", "summary": f"out of time ({left:.0f} s left)"}
            continue
        log(f"{name} ...")
        t0 = time.monotonic()
        try:
            result = STEP_FUNCTIONS[name](ctx)
        except Exception as e:  # a bug or an unexpected state: the other steps still run
            result = {"status": "failed", "summary": f"{type(e).__name__}: {e}"}
        result["seconds"] = time.monotonic() - t0
        record["steps"][name] = result
        log(f"{name}: {result['status']} ({result['seconds']:.0f} s): {result.get('summary', '')}")
        if result["status"] != "passed":
            print(ctx.runner.tail(30), end="", flush=True)
        if name == "install" and result["status"] == "failed":
            failed_install = True
        record["figures"] = figures(ctx.speed)
        write_record(args.output, record)
    record["seconds"] = time.monotonic() - start
    record["complete"] = True
    write_record(args.output, record)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + render_table(record), flush=True)
    log(f"wrote {os.path.join(args.output, 'gpu_check.json')} and gpu_check.md, gpu_check.log beside it")
    return record


def write_record(output: str, record: dict) -> None:
    with open(os.path.join(output, "gpu_check.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(output, "gpu_check.md"), "w") as f:
        f.write(render_table(record))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        try:
            prepare(args.carry, args.official_repo)
        except RuntimeError as e:
            print(f"gpu_check.py --prepare: {e}", file=sys.stderr)
            return 1
        return 0
    record = check(args)
    asked = [record["steps"][s] for s in args.steps]
    return 0 if all(s["status"] == "passed" for s in asked) else 1


if __name__ == "__main__":
    sys.exit(main())
