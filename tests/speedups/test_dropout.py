"""The cheap CPU dropout masks (smca_d2.speedups.dropout): the same dropout in distribution as
torch's, reproducible under torch.manual_seed, and the same attention as torch's modules."""

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch import nn

from smca_d2.speedups.dropout import (
    FastCPUDropout,
    FastDropoutCoAttention,
    FastDropoutMultiheadAttention,
    attention,
    drop_mask,
    dropout,
    use_fast_cpu_dropout,
)

SCALE = 65536 / (65536 - 6554)  # p = 0.1 is dropped with probability 6554 / 65536


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_and_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.002  # 5 standard deviations at p = 0.5
    assert abs(y.mean().item() - 1.0) < 0.01  # kept elements are scaled by 1 / (1 - p)
    values = y.unique().tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(65536 / (65536 - round(p * 65536)))]


def test_mask_bits_are_independent_of_position():
    # The four 16-bit slices of each 64-bit draw must each be uniform: a wrong slicing or view
    # would show up as a different drop rate at one of the four positions.
    torch.manual_seed(0)
    drop = drop_mask((400_000, 4), 0.25)
    rates = drop.float().mean(0)
    assert torch.all((rates - 0.25).abs() < 0.005), rates


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(0)
    x = torch.randn(300, 70, requires_grad=True)
    y = dropout(x, 0.1)
    y.backward(torch.full_like(y, 2.0))
    kept = y != 0
    assert torch.equal(x.grad, kept.float() * 2.0 * SCALE)
    assert torch.allclose(y[kept], x.detach()[kept] * SCALE)


def test_reproducible_under_manual_seed_and_fresh_per_call():
    torch.manual_seed(3)
    a, b = drop_mask((64, 33), 0.5), drop_mask((64, 33), 0.5)
    torch.manual_seed(3)
    a2 = drop_mask((64, 33), 0.5)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)


def test_identity_and_edge_cases():
    x = torch.randn(10, 10)
    assert dropout(x, 0.1, training=False) is x
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert drop_mask((3, 50), 1.0).all() and not drop_mask((3, 50), 0.0).any()
    assert drop_mask((3, 50), 0.5).dtype == torch.bool
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)
    # in eval mode (and on other devices): torch's own dropout
    assert torch.equal(FastCPUDropout(0.3).eval()(x), x)


def test_dropout_module():
    m = FastCPUDropout(0.2)
    x = torch.randn(50, 40)
    assert torch.equal(m.eval()(x), x)
    m.train()
    torch.manual_seed(1)
    y = m(x)
    torch.manual_seed(1)
    assert torch.equal(y, dropout(x, 0.2))
    torch.manual_seed(1)
    assert torch.equal(nn.Dropout(0.2)(x), (torch.manual_seed(1), F.dropout(x, 0.2, True))[1])
    assert "p=0.2" in repr(m)


def _reference_attention(q, k, v, bias, drop, scale):
    w = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + bias).softmax(-1)
    return w.masked_fill(drop, 0) * scale @ v


def test_attention_with_dropout_is_the_explicit_formula():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=g)
    k, v = torch.randn(2, 4, 9, 16, generator=g), torch.randn(2, 4, 9, 16, generator=g)
    bias = torch.randn(2, 1, 7, 9, generator=g)
    bias[1, :, :, -3:] = float("-inf")
    torch.manual_seed(7)
    out = attention(q, k, v, bias, dropout_p=0.1)
    torch.manual_seed(7)
    drop = drop_mask((2, 4, 7, 9), 0.1)
    assert torch.allclose(out, _reference_attention(q, k, v, bias, drop, SCALE), atol=1e-6)
    # without dropout: scaled_dot_product_attention itself
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert torch.equal(attention(q, k, v, bias, dropout_p=0.0), ref)


def test_attention_with_dropout_gradients_are_the_explicit_formulas():
    # softmax, dropout and the product with v are one autograd node: its backward is written out
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 6, 6))
    bias = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64)
    bias[0, :, :, -2:] = float("-inf")
    torch.manual_seed(3)
    drop = drop_mask((2, 4, 5, 6), 0.3)

    def seeded(q, k, v):
        torch.manual_seed(3)
        return attention(q, k, v, bias, dropout_p=0.3)

    scale = 65536 / (65536 - round(0.3 * 65536))
    upstream = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(seeded(q, k, v), (q, k, v), upstream)
    reference = torch.autograd.grad(_reference_attention(q, k, v, bias, drop, scale), (q, k, v), upstream)
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(seeded, (q, k, v))


def test_attention_with_dropout_under_cpu_autocast():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        out = attention(q, k, v, None, dropout_p=0.1)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 and t.grad.abs().sum() > 0 for t in (q, k, v))


def _pair(dropout_p):
    torch.manual_seed(0)
    ours = FastDropoutMultiheadAttention(32, 4, dropout=dropout_p, batch_first=True)
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(32, 4, dropout=dropout_p, batch_first=True)
    return ours, theirs


def test_multihead_attention_matches_torch():
    ours, theirs = _pair(0.1)
    # same parameters, initialization and state-dict keys
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 10, 32, generator=g), torch.randn(2, 10, 32, generator=g)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    # eval, and the cheap path's own computation without dropout: torch's results
    ours.eval(), theirs.eval()
    ref = theirs(x, x, v, key_padding_mask=pad, need_weights=False)[0]
    assert torch.equal(ours(x, x, v, key_padding_mask=pad, need_weights=False)[0], ref)
    assert torch.allclose(ours._project_and_attend(x, x, v, pad, 0.0), ref, atol=1e-6)
    assert torch.allclose(ours._project_and_attend(x, x.clone(), v, pad, 0.0), ref, atol=1e-6)
    # training with dropout: the explicit formula with the seeded mask
    ours.train()
    torch.manual_seed(4)
    out, weights = ours(x, x, v, key_padding_mask=pad, need_weights=False)
    assert weights is None
    torch.manual_seed(4)
    drop = drop_mask((2, 4, 10, 10), 0.1)
    c, w, b = 32, ours.in_proj_weight, ours.in_proj_bias

    def heads(t):
        return t.view(2, 10, 4, 8).transpose(1, 2)

    q, k, vv = (heads(F.linear(t, w[i * c : (i + 1) * c], b[i * c : (i + 1) * c])) for i, t in enumerate((x, x, v)))
    bias = torch.zeros(2, 1, 1, 10).masked_fill(pad[:, None, None, :], float("-inf"))
    manual = ours.out_proj(_reference_attention(q, k, vv, bias, drop, SCALE).transpose(1, 2).flatten(2))
    assert torch.allclose(out, manual, atol=1e-6)
    # need_weights (or torch's dropout): torch's module, torch's random stream
    torch.manual_seed(4)
    a = ours(x, x, v, key_padding_mask=pad, need_weights=True)
    torch.manual_seed(4)
    b_ = theirs.train()(x, x, v, key_padding_mask=pad, need_weights=True)
    assert torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1])
    # a float key_padding_mask (added to the logits) also goes to torch's module
    float_pad = torch.zeros(2, 10).masked_fill(pad, float("-inf"))
    torch.manual_seed(4)
    a = ours(x, x, v, key_padding_mask=float_pad, need_weights=False)[0]
    torch.manual_seed(4)
    assert torch.equal(a, theirs(x, x, v, key_padding_mask=float_pad, need_weights=False)[0])


def test_use_fast_cpu_dropout_reaches_every_module_and_keeps_eval_outputs():
    import copy
    import os

    from smca_d2.engine import load_config
    from smca_d2.modeling.attention import SpatiallyModulatedCoAttention

    from detectron2.config import instantiate

    cfg = load_config(os.path.join(REPO, "configs", "common", "r18_synthetic.py"))
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    fast = copy.deepcopy(model)
    n = use_fast_cpu_dropout(fast)
    plain_types = (nn.Dropout, nn.MultiheadAttention, SpatiallyModulatedCoAttention)
    assert n == sum(type(m) in plain_types for m in model.modules()) > 5
    assert not any(type(m) in plain_types for m in fast.modules())
    assert sum(isinstance(m, FastDropoutCoAttention) for m in fast.modules()) == 3
    assert use_fast_cpu_dropout(fast) == 0  # idempotent
    assert fast.state_dict().keys() == model.state_dict().keys()
    model.eval(), fast.eval()
    image = torch.rand(3, 64, 80) * 255
    with torch.no_grad():
        a, b = (m([{"image": image}])[0]["instances"] for m in (model, fast))
    assert torch.equal(a.scores, b.scores)
