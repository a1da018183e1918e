"""smca_d2.model_zoo: shipped configs by name, with detectron2.model_zoo's semantics; config names
accepted wherever a config path is; checkpoints that cannot be fetched."""

import logging
import os

import pytest
import torch
from conftest import REPO
from omegaconf import DictConfig

from smca_d2 import model_zoo
from smca_d2.checkpoint import CheckpointUnavailableError, SafeCheckpointer
from smca_d2.engine import load_config
from smca_d2.modeling import SMCADETR

from detectron2.config import LazyConfig

DEMO = "demo/smca_r18_synthetic.py"


def test_every_shipped_config_is_listed():
    shipped = set()
    for folder, _, files in os.walk(os.path.join(REPO, "configs")):
        rel = os.path.relpath(folder, os.path.join(REPO, "configs"))
        if rel.split(os.sep)[0] != "common":
            shipped |= {os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(".py")}
    assert set(model_zoo.available_configs()) == shipped
    assert "smca_single_scale_r50_50ep.py" in shipped and DEMO in shipped


def test_shipped_configs_are_loaded_as_written():
    """Our configs name the functions that run and declare every train option: loading them as
    train_net.py does changes nothing."""
    for name in model_zoo.available_configs() + ["common/r18_synthetic.py"]:
        path = os.path.join(REPO, "configs", name)
        cfg, changes = load_config(path, return_changes=True)
        assert changes == [], name
        assert cfg == LazyConfig.load(path), name


@pytest.mark.parametrize(
    "name", ["smca_multi_scale_r50_50ep.py", "smca_multi_scale_r50_50ep", "configs/smca_multi_scale_r50_50ep.py"]
)
def test_get_config_file_accepts_names(name):
    path = model_zoo.get_config_file(name)
    assert os.path.samefile(path, os.path.join(REPO, "configs", "smca_multi_scale_r50_50ep.py"))


def test_unknown_name_lists_the_available_configs():
    with pytest.raises(model_zoo.ConfigNotFoundError) as e:
        model_zoo.get_config("smca_single_scale_r5O_50ep.py")
    message = str(e.value)
    assert "did you mean smca_single_scale_r50_50ep.py" in message
    for name in model_zoo.available_configs():
        assert f"  {name}\n" in message + "\n"


def test_get_config_returns_a_lazyconfig():
    cfg = model_zoo.get_config("smca_multi_scale_r50_50ep.py")
    assert isinstance(cfg, DictConfig)
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg.keys())
    assert cfg.train.init_checkpoint.endswith("R-50.pkl")


def test_trained_without_a_published_checkpoint_says_how_to_pass_weights():
    with pytest.raises(model_zoo.NoTrainedCheckpointError, match="train.init_checkpoint="):
        model_zoo.get_config("smca_single_scale_r50_50ep.py", trained=True)
    with pytest.raises(model_zoo.NoTrainedCheckpointError):
        model_zoo.get(DEMO, trained=True)


def test_get_builds_the_model_and_loads_a_published_checkpoint(tmp_path, monkeypatch):
    model = model_zoo.get(DEMO, device="cpu")
    assert isinstance(model, SMCADETR) and model.training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    path = str(tmp_path / "published.pth")
    torch.save({"model": model.state_dict()}, path)
    monkeypatch.setitem(model_zoo.CHECKPOINTS, DEMO, path)

    assert model_zoo.get_config(DEMO, trained=True).train.init_checkpoint == path
    trained = model_zoo.get(DEMO, trained=True, device="cpu")
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(model_zoo.get(DEMO, device="cpu").class_embed.weight, model.class_embed.weight)


def test_config_names_work_where_paths_do():
    by_name = load_config(DEMO, ["train.max_iter=7"])
    by_path = load_config(os.path.join(REPO, "configs", DEMO), ["train.max_iter=7"])
    assert by_name == by_path and by_name.train.max_iter == 7
    with pytest.raises(model_zoo.ConfigNotFoundError, match="no config file 'nope.py'"):
        load_config("nope.py")


# -- checkpoints given as URLs -----------------------------------------------------------------
UNREACHABLE = "http://127.0.0.1:9/weights/R-50.pkl"  # the discard port: refused at once


def _tiny_model():
    return torch.nn.Sequential(torch.nn.Linear(3, 2))


def test_unreachable_checkpoint_url_is_one_clear_error():
    with pytest.raises(CheckpointUnavailableError) as e:
        SafeCheckpointer(_tiny_model()).load(UNREACHABLE)
    message = str(e.value)
    assert UNREACHABLE in message and "train.init_checkpoint=/path/to/R-50.pkl" in message
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_get_without_network_keeps_random_weights_with_a_warning(monkeypatch, caplog):
    cfg = model_zoo.get_config(DEMO)
    cfg.train.init_checkpoint = UNREACHABLE
    monkeypatch.setattr(model_zoo.model_zoo, "get_config", lambda name, trained=False: cfg)
    with caplog.at_level(logging.WARNING, logger="smca_d2.model_zoo"):
        model = model_zoo.get(DEMO, device="cpu")
    assert isinstance(model, SMCADETR)
    assert "could not fetch the checkpoint" in caplog.text and "random initialisation" in caplog.text


def test_missing_local_checkpoint_is_named(tmp_path):
    missing = str(tmp_path / "model_final.pth")
    with pytest.raises(CheckpointUnavailableError, match="model_final.pth does not exist"):
        SafeCheckpointer(_tiny_model()).load(missing)


def test_matching_heuristics_url_query(tmp_path):
    model = _tiny_model()
    path = str(tmp_path / "weights.pth")
    # Names without the "0." prefix: only detectron2's matching heuristics map them to the model.
    torch.save({"model": {"weight": torch.ones(2, 3), "bias": torch.ones(2)}}, path)
    SafeCheckpointer(model).load(path)
    assert not torch.equal(model[0].weight, torch.ones(2, 3))
    SafeCheckpointer(model).load(path + "?matching_heuristics=True")
    assert torch.equal(model[0].weight, torch.ones(2, 3)) and torch.equal(model[0].bias, torch.ones(2))
    with pytest.raises(ValueError, match="[Uu]nsupported query"):
        SafeCheckpointer(model).load(path + "?strict=1")


# -- the scripts: one message instead of a traceback ------------------------------------------
def _run(args, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_demo_without_network_names_the_checkpoint_and_how_to_pass_it(tmp_path):
    import numpy as np
    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(image)
    proc = _run(
        [
            os.path.join(REPO, "demo", "demo.py"),
            "--config-file",
            "smca_single_scale_r50_50ep.py",
            "--input",
            str(image),
            "--output",
            str(tmp_path / "out"),
        ],
        tmp_path,
    )
    output = proc.stdout + proc.stderr  # detectron2's logger writes to stdout
    assert proc.returncode == 2, output
    assert "could not fetch the checkpoint detectron2://ImageNetPretrained/torchvision/R-50.pkl" in output
    assert "train.init_checkpoint=/path/to/R-50.pkl" in output and "Traceback" not in output


def test_train_net_with_an_unknown_config_name_lists_the_configs(tmp_path):
    proc = _run([os.path.join(REPO, "train_net.py"), "--config-file", "smca_single_scale_r50_5ep.py"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        "no config file 'smca_single_scale_r50_5ep.py'" in proc.stderr and "  demo/smca_r18_synthetic.py" in proc.stderr
    )
