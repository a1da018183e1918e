import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

# Two threads per test process on the 2-core CI machines; `make test` runs the tests in two
# pytest-xdist workers, so each worker (and each process that its tests start, which inherit
# OMP_NUM_THREADS) gets its share of the cores, not all of them.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch was imported before it was set

import smca_d2  # noqa: E402, F401  (applies the detectron2 compatibility fixes first)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path):
    """Import a script of the repository (e.g. ``tools/benchmark.py``) as a module."""
    name = "smca_d2_script_" + relative_path.replace("/", "_").replace(".py", "")
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_coco(root, num_images=4, size=(64, 80), num_classes=2, seed=0):
    """Write a tiny COCO-format dataset of coloured rectangles on noise.

    Returns:
        (json_path, image_dir)
    """
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    h, w = size
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for _ in range(rng.integers(1, 3) + 1):
            bw, bh = rng.integers(12, 28, size=2)
            x0, y0 = rng.integers(0, w - bw), rng.integers(0, h - bh)
            category = int(rng.integers(1, num_classes + 1))
            img[y0 : y0 + bh, x0 : x0 + bw] = (200, 40, 40) if category == 1 else (40, 200, 40)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [int(x0), int(y0), int(bw), int(bh)],
                    "area": int(bw * bh),
                    "iscrowd": 0,
                }
            )
        name = f"{image_id:04d}.png"
        Image.fromarray(img).save(os.path.join(image_dir, name))
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    categories = [{"id": i, "name": f"class{i}"} for i in range(1, num_classes + 1)]
    json_path = os.path.join(root, "annotations.json")
    with open(json_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_path, image_dir


@pytest.fixture
def tiny_coco(tmp_path):
    return write_tiny_coco(str(tmp_path / "tiny_coco"))


@pytest.fixture(autouse=True, scope="session")
def _image_check_records(tmp_path_factory):
    """Records of passed image checks (smca_d2.data.check_cache) go to a folder of the test
    session, not to the user's ~/.cache; processes that the tests start inherit it."""
    previous = os.environ.get("SMCA_D2_DATA_CACHE")
    os.environ["SMCA_D2_DATA_CACHE"] = str(tmp_path_factory.mktemp("smca_d2_cache"))
    yield
    if previous is None:
        os.environ.pop("SMCA_D2_DATA_CACHE", None)
    else:
        os.environ["SMCA_D2_DATA_CACHE"] = previous
