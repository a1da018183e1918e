"""kill -9 of train_net.py (during a checkpoint write, and at a random moment), then --resume:
training continues from the last complete checkpoint and ends with the same weights, optimizer
state and iteration as a run that was never interrupted."""

import os
import random
import signal
import subprocess
import time

import pytest
import torch
from reliability_helpers import run_train_net, tiny, train_net_cmd, train_net_env

MAX_ITER = 14
# Augmentations (random flip) and dropout stay on: their random numbers must resume too. So does
# the moving average of the weights.
SETTINGS = [
    f"train.max_iter={MAX_ITER}",
    "train.checkpointer.period=2",
    "train.checkpointer.max_to_keep=2",
    "train.eval_period=0",
    "train.seed=3",
    "train.ema.enabled=True",
    "train.ema.decay=0.9",
]


def _start(tmp_path, out, *extra):
    return subprocess.Popen(
        train_net_cmd(*extra, *tiny(out, *SETTINGS)),
        env=train_net_env(tmp_path),
        cwd=str(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _kill_when(process, condition, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"train_net.py ended (code {process.returncode}) before it could be killed")
        if condition():
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.002)
    process.kill()
    raise AssertionError("the kill condition never became true")


def _last(out):
    path = out / "last_checkpoint"
    return path.read_text() if path.exists() else ""


def _checkpoint_iteration(out):
    return torch.load(out / _last(out), weights_only=True)["iteration"]


@pytest.mark.slow
def test_kill9_then_resume_matches_an_uninterrupted_run(tmp_path):
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    note = f"(random seed of this test: {seed})"

    reference = tmp_path / "reference"
    run = run_train_net(tmp_path, *tiny(reference, *SETTINGS))
    assert run.returncode == 0, run.stderr[-3000:]

    out = tmp_path / "interrupted"
    # 1. kill -9 while a checkpoint is being written (its temporary file exists)
    target = rng.choice([3, 5, 7])  # the checkpoint of that iteration is the one cut short
    process = _start(tmp_path, out)
    # (should polling miss the write, the kill comes right after it: still a valid interruption)
    _kill_when(
        process, lambda: (out / f"model_{target:07d}.pth.tmp").exists() or _last(out) == f"model_{target:07d}.pth"
    )
    assert process.returncode == -signal.SIGKILL
    if (out / f"model_{target:07d}.pth.tmp").exists():  # killed inside the write (almost always)
        assert _last(out) == f"model_{target - 2:07d}.pth", note  # the previous, complete checkpoint
        assert not (out / f"model_{target:07d}.pth").exists(), note
    for path in out.glob("*.pth"):  # every visible checkpoint is complete
        torch.load(path, weights_only=True)
    resumed_from = _last(out)

    # 2. resume, and kill -9 again at a random moment: after it wrote a new checkpoint, plus a
    #    random delay (in a training step, a checkpoint write, or between them)
    process = _start(tmp_path, out, "--resume")
    delay = rng.uniform(0.0, 0.5)
    progressed = []

    def condition():
        if not progressed and _last(out) != resumed_from:
            progressed.append(time.time())
        return bool(progressed) and time.time() - progressed[0] > delay

    _kill_when(process, condition)
    assert process.returncode == -signal.SIGKILL
    killed_after = _checkpoint_iteration(out)
    assert killed_after < MAX_ITER - 1, note

    # 3. resume to the end
    final = run_train_net(tmp_path, "--resume", *tiny(out, *SETTINGS))
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"Starting training from iteration {killed_after + 1}" in final.stdout + final.stderr

    a = torch.load(reference / "model_final.pth", weights_only=True)
    b = torch.load(out / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == MAX_ITER - 1
    for weights in ("model", "model_ema"):
        mismatched = [k for k in a[weights] if not torch.equal(a[weights][k], b[weights][k])]
        assert not mismatched, f"{weights}: {len(mismatched)} tensors differ, e.g. {mismatched[:3]} {note}"
    assert a["trainer"]["hooks"]["EMAHook"] == b["trainer"]["hooks"]["EMAHook"] == {"num_updates": MAX_ITER}
    opt_a, opt_b = a["trainer"]["optimizer"]["state"], b["trainer"]["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i]), note
