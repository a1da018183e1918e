"""Distribution: the wheel carries the configs and works outside the source tree; the
requirement helper of scripts/bootstrap.sh; SMCA_D2_SYSTEM_SITE=1 leaves installed packages alone."""

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest
from conftest import REPO, load_script

import smca_d2

missing_requirements = load_script("scripts/missing_requirements.py")


def _other_site_dirs():
    """The site folders this interpreter sees, less the one with smca_d2's editable install."""
    own = os.path.realpath(sysconfig.get_paths()["purelib"])
    return [
        p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and os.path.realpath(p) != own
    ]


def _venv_seeing(path, site_dirs):
    """A fresh venv at ``path`` whose own site-packages is empty and that sees ``site_dirs``."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = os.path.join(path, "bin", "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(purelib, "00-test-base.pth"), "w") as f:
        f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in site_dirs) + "\n")
    return python, purelib


@pytest.mark.slow
def test_wheel_works_outside_the_source_tree(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist), REPO],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = dist.glob("smca_d2-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("smca_single_scale_r50_50ep.py", "demo/smca_r18_synthetic.py", "common/train.py"):
        assert f"smca_d2/model_zoo/configs/{config}" in names
    assert any(n.endswith((".dist-info/licenses/LICENSE", ".dist-info/LICENSE")) for n in names)

    python, purelib = _venv_seeing(tmp_path / "venv", _other_site_dirs())
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    script = textwrap.dedent(
        f"""
        import numpy as np
        import smca_d2
        from smca_d2 import model_zoo
        from smca_d2.inference import LazyPredictor
        from smca_d2.modeling import SMCADETR

        assert smca_d2.__file__.startswith({purelib!r}), smca_d2.__file__
        model = model_zoo.get("smca_single_scale_r50_50ep.py", device="cpu")
        assert isinstance(model, SMCADETR), type(model)
        cfg = model_zoo.get_config("smca_multi_scale_r50_50ep.py")
        assert cfg.model._target_ is SMCADETR or "SMCADETR" in str(cfg.model._target_)
        try:
            model_zoo.get_config("no_such_config.py")
            raise AssertionError("an unknown name was accepted")
        except model_zoo.ConfigNotFoundError as e:
            assert "smca_single_scale_r50_50ep.py" in str(e)
        predictor = LazyPredictor("demo/smca_r18_synthetic.py", "", device="cpu")
        out = predictor(np.zeros((48, 64, 3), dtype=np.uint8))
        assert list(out) == ["instances"] and out["instances"].image_size == (48, 64)
        print("wheel ok")
        """
    )
    # A proxy on the discard port: fetching the ImageNet weights fails at once instead of
    # downloading them on a machine with network access.
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "PYTHONPATH": ""}
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([python, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wheel ok" in proc.stdout
    assert "could not fetch the checkpoint detectron2://ImageNetPretrained/torchvision/R-50.pkl" in proc.stderr


def test_missing_requirements_lists_only_what_is_absent(tmp_path):
    versions = {"numpy": "2.0.0", "fvcore": "0.1.6", "hydra-core": "1.3.2"}
    requirements = [
        "numpy",
        "fvcore>=0.1.5,<0.1.6",
        "Hydra_Core>=1.1",
        "surely-not-installed>=1",
        "tqdm; python_version < '3'",
    ]
    missing, notes = missing_requirements.missing_requirements(requirements, versions)
    assert missing == ["surely-not-installed>=1"]
    assert notes == ["fvcore 0.1.6 is installed; smca-d2 asks for <0.1.6,>=0.1.5 (left as it is)"]

    req_file = tmp_path / "req.txt"
    req_file.write_text("# comment\nnumpy  # trailing\n\n-c other.txt\nsurely-not-installed>=1\n")
    assert missing_requirements.read_requirements([str(req_file)]) == ["numpy", "surely-not-installed>=1"]
    pins = tmp_path / "pins.txt"
    missing_requirements.main([str(req_file), "--constraints", str(pins)])
    lines = pins.read_text().splitlines()
    assert any(line.startswith("numpy==") for line in lines) and not any(line.startswith("surely") for line in lines)


@pytest.mark.slow
def test_system_site_bootstrap_leaves_installed_packages_alone(tmp_path):
    """SMCA_D2_SYSTEM_SITE=1 on top of a user's environment (here: a venv seeing the cached base,
    with tabulate at another version than requirements/constraints.txt pins): nothing is
    installed into .venv but smca-d2 itself, and the user's tabulate stays."""
    user_python, user_site = _venv_seeing(tmp_path / "user-env", _other_site_dirs())
    # The user's tabulate "0.8.0": the installed module under another version, first on their path.
    import tabulate

    os.makedirs(os.path.join(user_site, "tabulate-0.8.0.dist-info"))
    with open(os.path.join(user_site, "tabulate-0.8.0.dist-info", "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: tabulate\nVersion: 0.8.0\n")
    with open(tabulate.__file__) as f:
        source = f.read()
    with open(os.path.join(user_site, "tabulate.py"), "w") as f:
        f.write(source + "\n__version__ = '0.8.0'\n")

    checkout = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    archive = subprocess.run(
        ["tar", "-C", REPO, "--null", "-T", "-", "-cf", "-"], input=files, check=True, capture_output=True
    ).stdout
    checkout.mkdir()
    subprocess.run(["tar", "-xf", "-", "-C", str(checkout)], input=archive, check=True)

    env = {**os.environ, "PYTHON": user_python, "SMCA_D2_SYSTEM_SITE": "1", "PIP_NO_INDEX": "1"}
    env.pop("DETECTRON2_SRC", None)
    proc = subprocess.run(
        ["bash", "scripts/bootstrap.sh"], cwd=checkout, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every requirement is already installed" in proc.stderr

    venv_python = str(checkout / ".venv" / "bin" / "python")
    out = subprocess.run(
        [venv_python, "-c", "import tabulate, smca_d2, detectron2; print(tabulate.__version__, smca_d2.__file__)"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out[0] == "0.8.0" and out[1].startswith(str(checkout))
    venv_site = subprocess.run(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    installed = sorted(n for n in os.listdir(venv_site) if n.endswith(".dist-info"))
    assert installed == [f"smca_d2-{smca_d2.__version__}.dist-info"], installed


uv_index_args = load_script("scripts/uv_index_args.py")


def test_uv_index_args_follow_pips_configuration():
    """bootstrap.sh gives uv pip's indexes, find-links, constraints and certificate, each from the
    section pip itself would take it from (PIP_* variables over [install] over [global])."""
    config_list = textwrap.dedent(
        """\
        global.index-url='https://global.example/simple'
        install.index-url='https://install.example/simple'
        global.extra-index-url='file:///a/simple file:///b/simple'
        :env:.find-links='/wheels'
        global.find-links='/ignored'
        global.constraint='/etc/caps.txt'
        global.cert='/etc/ca.pem'
        global.timeout='60'
        """
    )
    settings = uv_index_args.pip_settings(config_list)
    assert settings["index-url"] == "https://install.example/simple"
    assert settings["find-links"] == "/wheels"
    assert uv_index_args.uv_args(settings) == [
        "--index-strategy",
        "unsafe-best-match",
        "--index-url",
        "https://install.example/simple",
        "--extra-index-url",
        "file:///a/simple",
        "--extra-index-url",
        "file:///b/simple",
        "--find-links",
        "/wheels",
        "--constraint",
        "/etc/caps.txt",
        "SSL_CERT_FILE=/etc/ca.pem",
    ]
    assert uv_index_args.uv_args(uv_index_args.pip_settings("")) == ["--index-strategy", "unsafe-best-match"]


def _write_wheel(folder, name, version):
    """A minimal pure-Python wheel of one module ``name`` holding ``VERSION``."""
    dist = f"{name}-{version}"
    path = os.path.join(folder, f"{dist}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}.py", f"VERSION = {version!r}\n")
        whl.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(
            f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        whl.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_uv_installs_from_pips_find_links_and_constraints(tmp_path):
    """The arguments bootstrap.sh passes to uv, from a pip configuration with no index, a
    find-links folder and a constraint file: uv installs the constrained version from that folder."""
    uv = pytest.importorskip("uv", reason="uv is in requirements/test.txt").find_uv_bin()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for version in ("1.0", "2.0"):
        _write_wheel(str(wheels), "smca_uv_probe", version)
    caps = tmp_path / "caps.txt"
    caps.write_text("smca_uv_probe<2\n")
    config = tmp_path / "pip-config-list.txt"
    config.write_text(f":env:.no-index='1'\nglobal.find-links='{wheels}'\nglobal.constraint='{caps}'\n")
    args = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "uv_index_args.py"), "--pip-config-list", str(config)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "--no-index" in args
    target = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    python = str(target / "bin" / "python")
    env = {**os.environ, "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    subprocess.run([uv, "pip", "install", "--quiet", "--python", python, *args, "smca_uv_probe"], check=True, env=env)
    out = subprocess.run(
        [python, "-c", "import smca_uv_probe; print(smca_uv_probe.VERSION)"], check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == "1.0"
