"""Training on CUDA: float16 autocast with the gradient scaler and the fused AdamW, a step skipped
on overflow, DDP over NCCL, and exact resume of train_net.py (float16, with the scaler's state).
Skipped without a CUDA device (``pytest -m cuda``; tools/gpu_check.sh runs them)."""

import socket

import pytest
import torch
from conftest import load_script
from cuda_helpers import CUDA_MARKS, exact_float32, tiny_model_and_batch

from smca_d2.compat import create_ddp_model
from smca_d2.engine import AMPTrainer

from detectron2.config import instantiate

pytestmark = CUDA_MARKS


def _optimizer(cfg, model):
    cfg.optimizer.params.model = model
    return instantiate(cfg.optimizer)


def test_float16_steps_with_the_grad_scaler_and_the_fused_adamw():
    """Steps of float16 autocast with the scaler (its default initial scale), through the fused
    AdamW: the first steps may overflow and be skipped while the scale comes down; then the
    weights train, in float32."""
    steps = 12
    cfg, model, batch = tiny_model_and_batch()
    optimizer = _optimizer(cfg, model)
    assert optimizer.defaults["fused"] is True  # torch's fused CUDA kernel (smca_d2.solver)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv_dtypes = []
    model.backbone.stem.conv1.register_forward_hook(lambda m, i, out: conv_dtypes.append(out.dtype))
    trainer = AMPTrainer(model, [batch] * steps, optimizer, device_type="cuda")
    assert trainer.dtype == torch.float16 and trainer.grad_scaler is not None
    initial_scale = trainer.grad_scaler.get_scale()
    trainer.train(0, steps)
    assert conv_dtypes == [torch.float16] * steps  # the forward ran under autocast
    state = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in state.items())  # float32 weights
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    changed = [k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") and k.endswith(".weight") for k in changed)
    assert any(k.startswith("transformer.decoder.") for k in changed), "every step overflowed"
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    scale = trainer.state_dict()["grad_scaler"]["scale"]
    assert 0 < scale <= initial_scale


def test_float16_loss_is_the_float32_loss_to_float16_precision():
    cfg, model, batch = tiny_model_and_batch("model.transformer.decoder.dropout=0.0")
    with exact_float32(), torch.no_grad():
        full = float(sum(model(batch).values()))
        with torch.autocast("cuda", dtype=torch.float16):
            half = float(sum(model(batch).values()))
    assert abs(half - full) <= 2e-2 * abs(full), (half, full)


def test_an_overflowing_step_is_skipped_and_the_scale_lowered():
    """GradScaler unscales before AdamWWithClipping.step (which clips the true gradients): with
    an overflowing scale the fused step is skipped, the weights stay, and the scale halves."""
    cfg, model, batch = tiny_model_and_batch()
    trainer = AMPTrainer(model, [batch], _optimizer(cfg, model), device_type="cuda")
    trainer.grad_scaler = torch.amp.GradScaler("cuda", init_scale=2.0**100)
    before = {k: v.clone() for k, v in model.named_parameters()}
    trainer.train(0, 1)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    assert trainer.grad_scaler.get_scale() == 2.0**99


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_over_nccl_trains_a_step():
    """create_ddp_model (detectron2's, through smca_d2.compat) on CUDA with NCCL, one process."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        cfg, model, batch = tiny_model_and_batch()
        ddp = create_ddp_model(model, broadcast_buffers=False)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        trainer = AMPTrainer(ddp, [batch] * 2, _optimizer(cfg, model), device_type="cuda")
        trainer.train(0, 2)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# train_net.py on CUDA, stopped and resumed
# ---------------------------------------------------------------------------------------------
MAX_ITER = 8
SETTINGS = [
    f"train.max_iter={MAX_ITER}",
    "train.device=cuda",
    "train.amp.enabled=True",  # float16: the gradient scaler's state is resumed too
    "train.checkpointer.period=2",
    "train.eval_period=0",
    "train.seed=3",
]


def _weights(path):
    return torch.load(path, weights_only=True)


def _max_difference(a, b) -> float:
    return max(
        float((a[k].double() - b[k].double()).abs().max())
        if a[k].is_floating_point()
        else float(not torch.equal(a[k], b[k]))
        for k in a
    )


def test_train_net_resumes_exactly_on_cuda(tmp_path):
    """A run stopped at iteration 5 (a NaN loss: the last checkpoint is iteration 3's) and resumed
    ends with the weights of an uninterrupted run: bit for bit where CUDA's kernels are
    deterministic; else no further from it than a second uninterrupted run is."""
    helpers = load_script("tests/reliability/reliability_helpers.py")  # (on the runs' PYTHONPATH)

    def train(out, *extra, flags=(), **env):
        run = helpers.run_train_net(tmp_path, *flags, *helpers.tiny(out, *SETTINGS, *extra), **env)
        return run, run.stdout + run.stderr

    reference = tmp_path / "reference"
    run, log = train(reference)
    assert run.returncode == 0, log[-3000:]
    assert "Mixed precision: float16 autocast on cuda with a gradient scaler" in log

    out = tmp_path / "interrupted"
    nan = ["model.criterion._target_=reliability_helpers.NaNAtCall"]
    run, log = train(out, *nan, SMCA_TEST_NAN_AT_CALL="5")
    assert run.returncode != 0 and "Non-finite loss at iteration 5" in log, log[-3000:]
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert "grad_scaler" in _weights(out / "model_0000003.pth")["trainer"]
    run, log = train(out, flags=["--resume"])
    assert run.returncode == 0, log[-3000:]
    assert "Starting training from iteration 4" in log

    a, b = _weights(reference / "model_final.pth"), _weights(out / "model_final.pth")
    assert a["iteration"] == b["iteration"] == MAX_ITER - 1
    assert a["trainer"]["grad_scaler"] == b["trainer"]["grad_scaler"]
    resumed = _max_difference(a["model"], b["model"])
    if resumed == 0:
        return
    again = tmp_path / "again"
    run, log = train(again)
    assert run.returncode == 0, log[-3000:]
    noise = _max_difference(a["model"], _weights(again / "model_final.pth")["model"])
    assert noise > 0, f"uninterrupted runs agree bit for bit, the resumed one differs by up to {resumed:.2e}"
    assert resumed <= 10 * noise, f"resumed run differs by {resumed:.2e}; two uninterrupted runs by {noise:.2e}"
