"""Helpers of the reliability tests. Also imported by train_net.py subprocesses (PYTHONPATH)."""

import json
import os
import uuid

import numpy as np
from PIL import Image

from smca_d2.modeling.criterion import SetCriterion

HERE = os.path.dirname(os.path.abspath(__file__))


def unique_name(prefix="reliability"):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def noise_image(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def write_coco(root, images, annotations, categories=None, raw_json=None):
    """Write ``images`` (dicts with id, file_name, height, width and an optional ``"pil"`` image to
    save under ``root/images``) and ``annotations`` as a COCO json. Returns (json_path, image_dir)."""
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    entries = []
    for img in images:
        img = dict(img)
        pil = img.pop("pil", None)
        save_kwargs = img.pop("save_kwargs", {})
        if pil is not None:
            pil.save(os.path.join(image_dir, img["file_name"]), **save_kwargs)
        entries.append(img)
    if categories is None:
        categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    for i, ann in enumerate(annotations):
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("category_id", 1)
        ann.setdefault("area", 1.0)
    json_path = os.path.join(root, "annotations.json")
    text = (
        raw_json
        if raw_json is not None
        else json.dumps({"images": entries, "annotations": annotations, "categories": categories})
    )
    with open(json_path, "w") as f:
        f.write(text)
    return json_path, image_dir


def simple_image(image_id, h=40, w=60, name=None, **extra):
    """An image entry with a noise RGB PNG."""
    name = name or f"{image_id:04d}.png"
    return dict(
        id=image_id, file_name=name, height=h, width=w, pil=Image.fromarray(noise_image(h, w, image_id)), **extra
    )


def register(json_path, image_dir, name=None):
    from detectron2.data.datasets import register_coco_instances

    name = name or unique_name()
    register_coco_instances(name, {}, json_path, image_dir)
    return name


class NaNAtCall(SetCriterion):
    """SetCriterion whose ``loss_bbox`` is NaN from the ``$SMCA_TEST_NAN_AT_CALL``-th call on
    (0-based; one call per training iteration)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0
        self.nan_at = int(os.environ.get("SMCA_TEST_NAN_AT_CALL", "-1"))

    def forward(self, outputs, targets):
        losses = super().forward(outputs, targets)
        if 0 <= self.nan_at <= self.calls:
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        self.calls += 1
        return losses


# --------------------------------------------------------------------------------------------
# train_net.py subprocesses
# --------------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(HERE))
R18_CONFIG = os.path.join(REPO, "configs", "common", "r18_synthetic.py")


def synthetic_data(tmp_path):
    """A tiny generated dataset under ``tmp_path/data`` (the DETECTRON2_DATASETS of the runs)."""
    from smca_d2.data.synthetic import make_synthetic_coco

    data = tmp_path / "data"
    if not data.exists():
        make_synthetic_coco(str(data / "synthetic"), num_train=8, num_val=4, seed=1)
    return data


def train_net_env(tmp_path, **extra):
    env = dict(os.environ, DETECTRON2_DATASETS=str(synthetic_data(tmp_path)), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def train_net_cmd(*args):
    import sys

    if "--config-file" not in args:
        args = ("--config-file", R18_CONFIG, *args)
    return [sys.executable, os.path.join(REPO, "train_net.py"), *args]


def tiny(out, *more):
    """The reduced R18 config of tests/test_train_net.py."""
    return [
        f"train.output_dir={out}",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "model.transformer.encoder.num_layers=1",
        "model.transformer.decoder.num_layers=2",
        "train.log_period=1",
        *more,
    ]


def run_train_net(tmp_path, *args, **env):
    import subprocess

    return subprocess.run(
        train_net_cmd(*args), env=train_net_env(tmp_path, **env), cwd=str(tmp_path), capture_output=True, text=True
    )
