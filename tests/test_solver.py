"""The optimizer of the SMCA recipe (smca_d2/solver.py): parameter groups, AdamW with clipping."""

import pytest
import torch
from torch import nn

from smca_d2.solver import AdamWWithClipping, param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        self.backbone[0].weight.requires_grad_(False)


def set_grads(model, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator) * scale


def test_param_groups():
    model = Net()
    groups = param_groups(model, base_lr=1e-4, backbone_lr_factor=0.1)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-5)]
    assert [len(g["params"]) for g in groups] == [2, 3]  # the frozen weight is left out
    assert not any(p is model.backbone[0].weight for g in groups for p in g["params"])


def test_param_groups_equal_detectron2_lr_factor_func():
    """The hyperparameters per tensor are those of detectron2 main's get_default_optimizer_params
    with lr_factor_func (weight decay on every tensor, as the SMCA recipe has it)."""
    import inspect

    from detectron2.solver import get_default_optimizer_params

    if "lr_factor_func" not in inspect.signature(get_default_optimizer_params).parameters:
        pytest.skip("this detectron2 (v0.6) has no lr_factor_func")
    model = Net()
    upstream = get_default_optimizer_params(
        model,
        base_lr=1e-4,
        weight_decay=1e-4,
        weight_decay_norm=1e-4,
        lr_factor_func=lambda name: 0.1 if name.startswith("backbone.") else 1.0,
    )
    ours = param_groups(model, base_lr=1e-4, backbone_lr_factor=0.1)
    per_tensor = lambda groups: {id(p): pytest.approx(g["lr"]) for g in groups for p in g["params"]}
    assert per_tensor(ours) == per_tensor(upstream)
    assert {g["weight_decay"] for g in upstream} == {1e-4}  # ours: the optimizer's weight_decay=1e-4
    assert len(ours) == 2


@pytest.mark.parametrize("fused", [None, False])
def test_step_is_adamw_on_clipped_gradients(fused):
    torch.manual_seed(0)
    ours, reference = Net(), Net()
    reference.load_state_dict(ours.state_dict())
    opt = AdamWWithClipping(param_groups(ours, base_lr=1e-2), max_grad_norm=0.1, fused=fused, weight_decay=1e-4)
    ref_opt = torch.optim.AdamW(param_groups(reference, base_lr=1e-2), weight_decay=1e-4, fused=False)
    assert opt.param_groups[0]["fused"] is (True if fused is None else None)  # CPU: fused by default
    for step in range(3):
        set_grads(ours, seed=step, scale=10.0)
        set_grads(reference, seed=step, scale=10.0)
        params = [p for p in reference.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, 0.1)
        assert norm > 1.0  # the clipping does something
        opt.step()
        ref_opt.step()
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_no_clipping_when_max_grad_norm_is_zero():
    model = Net()
    opt = AdamWWithClipping(model.parameters(), max_grad_norm=0.0, lr=1.0)
    set_grads(model, scale=100.0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_fused_only_where_asked_or_supported():
    assert AdamWWithClipping(Net().parameters(), foreach=True).param_groups[0]["foreach"]
    assert not AdamWWithClipping(Net().parameters(), foreach=True).param_groups[0]["fused"]
    assert not AdamWWithClipping(Net().parameters(), fused=False).param_groups[0]["fused"]


def test_grad_scaler_unscales_before_clipping():
    """Under float16 AMP, GradScaler.step must unscale first (the fused kernel's own unscaling
    would leave the clipping with scaled gradients): same update as without a scaler."""
    torch.manual_seed(0)
    scaled, plain = Net(), Net()
    plain.load_state_dict(scaled.state_dict())
    opt = AdamWWithClipping(scaled.parameters(), lr=1e-2)
    plain_opt = AdamWWithClipping(plain.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _step in range(2):
        x = torch.randn(5, 4)
        plain.zero_grad()
        plain.head(plain.backbone(x)).square().sum().backward()
        plain_opt.step()
        scaled.zero_grad()
        scaler.scale(scaled.head(scaled.backbone(x)).square().sum()).backward()
        scaler.step(opt)
        scaler.update()
    for a, b in zip(scaled.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_resumes_into_a_non_fused_optimizer():
    """A checkpoint's optimizer state loads into either kind (fused or not)."""
    model = Net()
    opt = AdamWWithClipping(model.parameters(), lr=1e-2)
    set_grads(model)
    opt.step()
    other = AdamWWithClipping(model.parameters(), lr=1e-2, fused=False)
    other.load_state_dict(opt.state_dict())
    set_grads(model, seed=1)
    other.step()
    assert other.state[model.head.weight]["step"] == 2
