"""The compatibility layer: detectron2 v0.6 without `_C` and detectron2 main with `_C`."""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from smca_d2 import compat
from smca_d2.engine import launch


def test_smca_d2_and_detectron2_import():
    import detectron2.engine
    import detectron2.evaluation
    import detectron2.model_zoo
    import detectron2.modeling

    assert hasattr(detectron2, "__version__")


def test_pillow_linear_available():
    from PIL import Image

    assert Image.LINEAR == Image.BILINEAR
    from detectron2.data import transforms as T

    T.ResizeShortestEdge(32, 64)  # its default interp argument is Image.LINEAR in v0.6


def test_model_zoo_configs_found():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("common/models/retinanet.py")
    assert os.path.isfile(path)


@pytest.mark.skipif(compat.HAS_C, reason="detectron2 has its compiled extension here")
def test_missing_extension_fails_clearly_only_when_called():
    import detectron2._C as ext
    from detectron2.layers import deform_conv  # noqa: F401  (imports fine)

    with pytest.raises(compat.MissingExtensionError, match="without its compiled"):
        _ = ext.deform_conv_forward
    assert not hasattr(ext, "box_iou_rotated")
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()


@pytest.mark.skipif(compat.HAS_C, reason="detectron2 has its compiled extension here")
def test_coco_evaluator_falls_back_to_pycocotools():
    from pycocotools.cocoeval import COCOeval

    from detectron2.evaluation import coco_evaluation

    assert coco_evaluation.COCOeval_opt is COCOeval


def test_apply_is_idempotent_and_noop_for_a_real_extension(monkeypatch):
    before = sys.modules.get("detectron2._C")
    compat.apply()
    assert sys.modules.get("detectron2._C") is before
    # A real compiled module in sys.modules is detected as such and left alone.
    fake_real = type(sys)("detectron2._C")
    monkeypatch.setitem(sys.modules, "detectron2._C", fake_real)
    assert compat._has_compiled_extension()
    monkeypatch.setattr(compat, "_applied", False)
    monkeypatch.setattr(compat, "HAS_C", False)
    compat.apply()
    assert compat.HAS_C and sys.modules["detectron2._C"] is fake_real


def test_pkg_resources_shim(monkeypatch):
    monkeypatch.setitem(sys.modules, "pkg_resources", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.delitem(sys.modules, "pkg_resources")
    compat._patch_pkg_resources()
    shim = sys.modules["pkg_resources"]
    monkeypatch.undo()
    path = shim.resource_filename("detectron2.model_zoo", "configs")
    assert os.path.isdir(path)


def test_create_ddp_model_single_process_is_identity():
    model = torch.nn.Linear(2, 2)
    assert compat.create_ddp_model(model) is model


def _ddp_worker(out_dir):
    import torch.distributed as dist

    from detectron2.utils import comm

    rank = comm.get_rank()
    assert comm.get_world_size() == 2 and comm.get_local_size() == 2
    torch.manual_seed(0)
    model = compat.create_ddp_model(torch.nn.Linear(3, 1))
    x = torch.full((4, 3), float(rank + 1))
    model(x).sum().backward()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    grad = model.module.weight.grad.clone()
    torch.save({"sum": total, "grad": grad, "backend": dist.get_backend()}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_launch_two_processes_on_cpu(tmp_path):
    launch(_ddp_worker, 2, dist_url="auto", args=(str(tmp_path),))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in results:
        assert r["sum"].item() == 3.0
        if not torch.cuda.is_available():
            assert r["backend"] == "gloo"
    # DDP averages gradients: sum over 4 rows of x, mean over ranks of (1, 2) -> 6 per weight.
    torch.testing.assert_close(results[0]["grad"], results[1]["grad"])
    torch.testing.assert_close(results[0]["grad"], torch.full((1, 3), 6.0))


def test_import_prints_no_deprecation_warning_of_other_packages(tmp_path):
    """fvcore and detectron2 call torch.jit.script at import time, which torch >= 2.14 reports as
    deprecated: importing smca_d2 does not print that warning, while a user's own
    torch.jit.script still does."""
    script = tmp_path / "user.py"
    script.write_text(
        "import warnings\n"
        "warnings.filterwarnings('error', message='`torch.jit.script` is deprecated')\n"
        "import smca_d2, train_net  # noqa: F401\n"
        "import torch\n"
        "def f(x: torch.Tensor):\n"
        "    return x + 1\n"
        "warnings.resetwarnings()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    torch.jit.script(f)\n"
        "print(sum('torch.jit.script' in str(w.message) for w in caught))\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr  # no warning while importing smca_d2 and train_net

    def g(x: torch.Tensor):
        return x + 1

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.script(g)
    warns_here = sum("torch.jit.script" in str(w.message) for w in caught)
    assert out.stdout.strip() == str(warns_here)  # the user's own call warns as torch makes it
