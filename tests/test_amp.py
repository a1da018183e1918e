"""Mixed-precision training (smca_d2/engine/amp.py): bfloat16 on the CPU, float16 with a scaler."""

import numpy as np
import pytest
import torch
from test_train_net import CONFIG, run_train_net, tiny_overrides
from tiny_smca import TINY_OVERRIDES as TINY_MODEL
from tiny_smca import rendered_batch

from smca_d2.checkpoint import SafeCheckpointer
from smca_d2.engine import AMPTrainer, amp_dtype, load_config

from detectron2.config import instantiate


def test_amp_dtype():
    assert amp_dtype("cuda") == torch.float16
    assert amp_dtype("cpu") == torch.bfloat16
    assert amp_dtype("cpu", "float16") == torch.float16
    assert amp_dtype("cuda", "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="train.amp.precision='float8'"):
        amp_dtype("cpu", "float8")
    with pytest.raises(ValueError, match="'cuda' or 'cpu', not 'mps'"):
        amp_dtype("mps")


def tiny_model_and_batch():
    torch.manual_seed(0)
    model = instantiate(load_config(CONFIG, TINY_MODEL).model)
    batch = rendered_batch(2)
    return model, batch


def run_steps(precision, steps=2):
    model, batch = tiny_model_and_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv_dtypes = []
    model.backbone.stem.conv1.register_forward_hook(lambda m, i, out: conv_dtypes.append(out.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = AMPTrainer(model, [batch] * steps, optimizer, device_type="cpu", precision=precision)
    trainer.train(0, steps)
    return trainer, model, before, conv_dtypes


def test_cpu_bfloat16_training_steps():
    trainer, model, before, conv_dtypes = run_steps(None)
    assert trainer.dtype == torch.bfloat16 and trainer.grad_scaler is None
    assert conv_dtypes == [torch.bfloat16, torch.bfloat16]  # the forward ran under autocast
    state = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in state.items())  # float32 weights
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    changed = [k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed)
    assert any(k.startswith("transformer.decoder.") for k in changed)
    assert "grad_scaler" not in trainer.state_dict()
    assert np.isfinite(trainer.storage.history("total_loss").latest())


def test_float16_resumes_from_a_checkpoint_without_scaler_state(tmp_path):
    """float16 adds a GradScaler (its round trip: tests/reliability/test_checkpoint_safety.py);
    resuming from a float32 or bfloat16 run's checkpoint, which has none, keeps a fresh one."""
    bf16, model, _, _ = run_steps("bfloat16", steps=1)
    SafeCheckpointer(model, str(tmp_path), trainer=bf16).save("model_0000000")
    fp16, model2, _, _ = run_steps("float16", steps=1)
    assert fp16.grad_scaler is not None
    scale = fp16.grad_scaler.get_scale()
    SafeCheckpointer(model2, str(tmp_path), trainer=fp16).resume_or_load("", resume=True)
    assert fp16.iter == bf16.iter and fp16.grad_scaler.get_scale() == scale


def test_bad_amp_precision_is_refused_before_training(tmp_path):
    out = tmp_path / "out"
    result = run_train_net(
        tmp_path,
        *tiny_overrides(out),
        "train.amp.enabled=True",
        "train.amp.precision=half",
        "train.max_iter=2",
        check=False,
    )
    assert result.returncode != 0
    assert "train.amp.precision='half': use 'float16', 'bfloat16' or None" in result.stderr
    assert not (out / "model_final.pth").exists()


@pytest.mark.slow
def test_train_net_bfloat16_on_cpu(tmp_path):
    out = tmp_path / "out"
    result = run_train_net(
        tmp_path,
        *tiny_overrides(out),
        "train.amp.enabled=True",
        "train.max_iter=2",
        "train.eval_period=2",
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Mixed precision: bfloat16 autocast on cpu" in log
    assert "copypaste: AP,AP50" in log
    assert (out / "model_final.pth").is_file()
