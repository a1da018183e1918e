"""Safe loading (no code runs from a checkpoint unless trusted) and atomic saving."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from smca_d2.checkpoint import (
    TRUST_ENV,
    CheckpointWriteError,
    DamagedCheckpointError,
    NonFiniteWeightsError,
    SafeCheckpointer,
    UnsafeCheckpointError,
    load_checkpoint_file,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)


class Evil:
    """Unpickling this creates a directory: a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def test_pth_with_code_is_refused_unless_trusted(tmp_path, monkeypatch):
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "evil.pth")
    torch.save({"model": Net().state_dict(), "extra": Evil(marker)}, path)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(UnsafeCheckpointError) as e:
        SafeCheckpointer(Net()).load(path)
    assert "refusing to load checkpoint" in str(e.value) and path in str(e.value)
    assert "os.makedirs" in str(e.value) and f"{TRUST_ENV}=1" in str(e.value)
    assert not os.path.exists(marker)

    monkeypatch.setenv(TRUST_ENV, "1")  # the user's explicit opt-in
    SafeCheckpointer(Net()).load(path)
    assert os.path.isdir(marker)


@pytest.mark.parametrize("protocol", [2, 4])
def test_model_zoo_pkl_of_numpy_arrays_loads(tmp_path, protocol):
    source = Net()
    weights = {k: v.numpy() for k, v in source.state_dict().items()}
    path = str(tmp_path / "zoo.pkl")
    with open(path, "wb") as f:
        pickle.dump(
            {"model": weights, "__author__": "Detectron2 Model Zoo", "scale": np.float32(2)}, f, protocol=protocol
        )
    model = Net()
    SafeCheckpointer(model).load(path)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_pkl_with_code_is_refused_unless_trusted(tmp_path, monkeypatch):
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "evil.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(3)}, "__author__": "x", "payload": Evil(marker)}, f)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(UnsafeCheckpointError, match="os.makedirs"):
        SafeCheckpointer(Net()).load(path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(path)
    assert not os.path.exists(marker)
    load_checkpoint_file(path, trust=True)
    assert os.path.isdir(marker)


def test_damaged_file_gives_a_clear_error(tmp_path):
    path = str(tmp_path / "model_0000001.pth")
    SafeCheckpointer(Net(), str(tmp_path)).save("model_0000001")
    data = Path(path).read_bytes()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(Exception, match="model_0000001.pth|zip|archive"):
        SafeCheckpointer(Net()).load(path)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
_KILL_DURING_SAVE = textwrap.dedent(
    """
    import io, os, signal, sys
    import torch
    from torch import nn
    import smca_d2  # noqa
    from detectron2.checkpoint import DetectionCheckpointer
    from smca_d2.checkpoint import SafeCheckpointer

    out, kind = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 10))
    checkpointer = (SafeCheckpointer if kind == "safe" else DetectionCheckpointer)(model, out, save_to_disk=True)
    checkpointer.save("model_0000001")
    with torch.no_grad():
        model[0].weight.add_(1.0)
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):  # kill -9 with half of the file written
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_die
    checkpointer.save("model_0000002")
    """
)


def _kill_during_save(tmp_path, kind):
    out = tmp_path / kind
    script = tmp_path / "kill_during_save.py"
    script.write_text(_KILL_DURING_SAVE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(script), str(out), kind], env=env, capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    return out


def test_kill_during_checkpoint_write_leaves_the_last_checkpoint_intact(tmp_path):
    out = _kill_during_save(tmp_path, "safe")
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_0000002.pth").exists()  # never visible half-written
    assert (out / "model_0000002.pth.tmp").exists()  # the partial data, under another name

    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 10))
    checkpointer = SafeCheckpointer(model, str(out))
    checkpointer.resume_or_load("", resume=True)
    expected = torch.load(out / "model_0000001.pth", weights_only=True)["model"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in expected.items())
    assert not (out / "model_0000002.pth.tmp").exists()  # cleaned up on resume


def test_detectron2_checkpointer_leaves_a_half_written_file(tmp_path):
    """What the atomic save prevents: detectron2 writes the final file directly."""
    out = _kill_during_save(tmp_path, "plain")
    partial = out / "model_0000002.pth"
    assert partial.exists() and str(partial) in SafeCheckpointer(Net(), str(out)).get_all_checkpoint_files()
    with pytest.raises(Exception):  # noqa: B017  (whatever torch raises for a truncated zip)
        torch.load(partial, weights_only=True)


def test_last_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    checkpointer = SafeCheckpointer(Net(), str(tmp_path))
    checkpointer.save("model_0000001")

    def crash(src, dst):
        raise KeyboardInterrupt  # interrupted just before the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000002")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]


def test_model_with_nan_weights_is_not_saved(tmp_path):
    model = Net()
    checkpointer = SafeCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="head.weight.*model_0000001.pth"):
        checkpointer.save("model_0000002")
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_trainer_state_with_amp_grad_scaler_round_trips(tmp_path):
    """Resume restores the iteration, the optimizer and the AMP grad scaler (AMPTrainer's state)."""
    from smca_d2.engine import AMPTrainer

    def trainer(scale=None):
        model = Net()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        amp = AMPTrainer(model, [None], optimizer, device_type="cpu", precision="float16")
        amp.grad_scaler.scale(torch.ones(()))  # creates the scale tensor
        if scale is not None:
            amp.grad_scaler.update(new_scale=scale)
        return amp, model, optimizer

    first, model, optimizer = trainer(scale=1234.0)
    model.head(model.body(torch.ones(2, 4))).sum().backward()
    optimizer.step()
    first.iter = 41
    SafeCheckpointer(model, str(tmp_path), trainer=first).save("model_0000041")

    second, model2, optimizer2 = trainer()
    SafeCheckpointer(model2, str(tmp_path), trainer=second).resume_or_load("", resume=True)
    assert second.iter == 41
    assert second.grad_scaler.get_scale() == 1234.0
    a, b = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)


# --------------------------------------------------------------------------------------------
# Disk full, damaged last checkpoint
# --------------------------------------------------------------------------------------------
_SAVE_WITH_FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import os, resource, signal, sys
    import torch
    from torch import nn
    import smca_d2  # noqa
    from smca_d2.checkpoint import CheckpointWriteError, SafeCheckpointer

    out = sys.argv[1]
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 10))
    checkpointer = SafeCheckpointer(model, out)
    checkpointer.save("model_0000001")
    # A full disk from here on: files cannot grow past a third of a checkpoint (writes fail with
    # EFBIG instead of the process being killed by SIGXFSZ).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = os.path.getsize(os.path.join(out, "model_0000001.pth")) // 3
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        checkpointer.save("model_0000002")
    except CheckpointWriteError as e:
        print(f"ERROR: {e}")
    """
)


def test_disk_full_during_a_checkpoint_write(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "save_with_limit.py"
    script.write_text(_SAVE_WITH_FILE_SIZE_LIMIT)
    run = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    message = run.stdout
    assert f"cannot write checkpoint {out / 'model_0000002.pth'}" in message
    assert "File too large" in message and "The last complete checkpoint is" in message
    assert str(out / "model_0000001.pth") in message
    assert sorted(p.name for p in out.iterdir()) == ["last_checkpoint", "model_0000001.pth"]  # no partial file
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    torch.load(out / "model_0000001.pth", weights_only=True)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")  # the output folder's path is taken by a file (root can write anywhere else)
    with pytest.raises(CheckpointWriteError, match=f"cannot write checkpoint {blocker}/model_0000001.pth"):
        SafeCheckpointer(Net(), str(blocker)).save("model_0000001")


def _three_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = Net()
    checkpointer = SafeCheckpointer(model, str(tmp_path))
    saved = {}
    for i in (1, 2, 3):
        with torch.no_grad():
            model.head.bias.fill_(float(i))
        checkpointer.save(f"model_000000{i}")
        saved[i] = torch.load(tmp_path / f"model_000000{i}.pth", weights_only=True)["model"]
        os.utime(tmp_path / f"model_000000{i}.pth", (i, i))  # written in this order
    return saved


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_with_a_damaged_last_checkpoint_uses_the_newest_good_one(tmp_path, damage, caplog):
    saved = _three_checkpoints(tmp_path)
    last = tmp_path / "model_0000003.pth"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")

    model = Net()
    with caplog.at_level("WARNING"):
        SafeCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved[2].items())
    assert "Resuming from" in caplog.text and "model_0000002.pth" in caplog.text and "model_0000003.pth" in caplog.text
    assert (tmp_path / "model_0000003.pth.damaged").exists() and not last.exists()  # set aside, not deleted
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"


def test_resume_with_every_checkpoint_damaged_refuses(tmp_path):
    _three_checkpoints(tmp_path)
    for i in (1, 2, 3):
        (tmp_path / f"model_000000{i}.pth").write_bytes(b"")
    with pytest.raises(DamagedCheckpointError, match="--resume found no readable checkpoint in"):
        SafeCheckpointer(Net(), str(tmp_path)).resume_or_load("", resume=True)
    assert sorted(p.name for p in tmp_path.glob("*.damaged")) == [f"model_000000{i}.pth.damaged" for i in (1, 2, 3)]


def test_metrics_write_on_a_full_disk_names_the_file(tmp_path):
    """/dev/full: every write fails with ENOSPC, as on a full disk."""
    from smca_d2.engine import MetricsWriteError, PeriodicWriter

    from detectron2.utils.events import EventStorage, JSONWriter

    class Trainer:
        iter, max_iter = 0, 1

    hook = PeriodicWriter([JSONWriter("/dev/full")], period=1)
    hook.trainer = Trainer()
    with EventStorage(0) as storage, pytest.raises(MetricsWriteError, match="metrics to /dev/full: .*No space left"):
        storage.put_scalar("loss", 1.0)
        hook.after_step()
