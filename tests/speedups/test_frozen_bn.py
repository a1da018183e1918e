"""The speed-ups of smca_d2.speedups keep the outputs: fuse_frozen_batchnorm,
fold_frozen_batchnorm, the fast CPU stem, channels-last, and optimize_for_training /
optimize_for_inference / apply_speedups, which combine them."""

import copy

import pytest
import torch

from smca_d2.speedups import (
    apply_speedups,
    fold_frozen_batchnorm,
    fuse_frozen_batchnorm,
    optimize_for_inference,
    optimize_for_training,
    use_fast_cpu_stem,
)
from smca_d2.speedups.dropout import FastCPUDropout, FastDropoutCoAttention, FastDropoutMultiheadAttention
from smca_d2.speedups.frozen_bn import FrozenBNConv2d
from smca_d2.speedups.stem import FastCPUStem

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone import BasicStem, ResNet


def _resnet(depth=18, freeze_at=0):
    torch.manual_seed(0)
    model = ResNet(
        BasicStem(in_channels=3, out_channels=64, norm="FrozenBN"),
        ResNet.make_default_stages(depth, norm="FrozenBN"),
        out_features=["res4", "res5"],
        freeze_at=freeze_at,
    ).eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial statistics, or folding would be an identity
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def test_fold_frozen_batchnorm_keeps_outputs():
    model = _resnet()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
    folded = copy.deepcopy(model)
    n = fold_frozen_batchnorm(folded)
    assert n == 1 + 8 * 2 + 3  # stem + two convs per basic block + three shortcut convs
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        out = folded(x)
    for k in ref:
        assert torch.allclose(out[k], ref[k], rtol=1e-4, atol=1e-4 * ref[k].abs().max()), k
    assert fold_frozen_batchnorm(folded) == 0  # idempotent


def test_fuse_frozen_batchnorm_keeps_outputs_gradients_and_checkpoints():
    model = _resnet(freeze_at=2)  # the stem and res2 frozen, as in the R50 configs
    fused = copy.deepcopy(model)
    assert fuse_frozen_batchnorm(fused) == 1 + 8 * 2 + 3
    assert fuse_frozen_batchnorm(fused) == 0  # idempotent
    assert isinstance(fused.res3[0].conv1, FrozenBNConv2d)
    assert fused.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k
    x = torch.randn(2, 3, 64, 96)
    ref, out = model(x), fused(x)
    for k in ref:
        assert torch.allclose(out[k], ref[k], rtol=1e-4, atol=1e-4 * float(ref[k].detach().abs().max())), k
    # Gradients: the same function of the same parameters (float64, or rounding would dominate).
    model64, fused64 = copy.deepcopy(model).double(), copy.deepcopy(fused).double()
    for m in (model64, fused64):
        sum(o.square().mean() for o in m(x.double()).values()).backward()
    params = dict(model64.named_parameters())
    trained = [(n, p) for n, p in fused64.named_parameters() if p.requires_grad]
    assert trained and all(not p.requires_grad for n, p in fused64.named_parameters() if n.startswith(("stem", "res2")))
    for name, p in trained:  # the convolution weights themselves are what is trained
        assert torch.allclose(p.grad, params[name].grad, rtol=1e-9, atol=1e-12), name
    # Inference folding afterwards: the convolutions become plain ones with folded weights.
    fused.eval()
    assert fold_frozen_batchnorm(fused) == 1 + 8 * 2 + 3
    with torch.no_grad():
        folded = fused(x)
    for k in ref:
        assert torch.allclose(folded[k], ref[k].detach(), rtol=1e-4, atol=1e-4 * float(ref[k].detach().abs().max())), k


def test_strided_1x1_convolutions_subsample_their_input_on_the_cpu(monkeypatch):
    """The downsampling shortcuts (1x1, stride 2) run as stride-1 convolutions of every other
    pixel, fused or folded, with the same outputs and gradients as the strided convolutions."""
    model = _resnet(freeze_at=2)
    fused = copy.deepcopy(model)
    fuse_frozen_batchnorm(fused)
    calls = []
    conv2d = torch.nn.functional.conv2d

    def recording(x, weight, bias=None, stride=1, *args):
        calls.append((tuple(weight.shape[-2:]), tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * 2))
        return conv2d(x, weight, bias, stride, *args)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
    x = torch.randn(2, 3, 66, 97)  # odd sizes: ceil(n / 2) rows and columns either way
    ref = model(x)
    assert ((1, 1), (2, 2)) in calls  # the plain Conv2d's shortcuts are strided
    calls.clear()
    out = fused(x)
    assert len(calls) == 1 + 8 * 2 + 3 and ((1, 1), (2, 2)) not in calls
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4 * float(ref[k].abs().max()))
    fused.eval()
    fold_frozen_batchnorm(fused)
    calls.clear()
    with torch.no_grad():
        folded = fused(x)
    assert ((1, 1), (2, 2)) not in calls
    for k in ref:
        torch.testing.assert_close(folded[k], ref[k].detach(), rtol=1e-4, atol=1e-4 * float(ref[k].abs().max()))


def _r18_smca_with_frozen_bn():
    import os

    from detectron2.config import LazyCall as L
    from detectron2.config import LazyConfig, instantiate

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = LazyConfig.load(os.path.join(repo, "configs", "smca_single_scale_r50_50ep.py")).model
    # R18 with the R50 config's frozen batch norms (quicker to build).
    cfg.backbone.stages = L(ResNet.make_default_stages)(depth=18, norm="FrozenBN")
    cfg.transformer.encoder.num_layers = 1
    cfg.transformer.decoder.num_layers = 2
    return instantiate(cfg)


def test_the_model_is_built_plain_and_optimize_for_training_applies_each_option():
    model = _r18_smca_with_frozen_bn()
    speedup_types = (FrozenBNConv2d, FastCPUStem, FastCPUDropout, FastDropoutMultiheadAttention, FastDropoutCoAttention)
    assert not any(isinstance(m, speedup_types) for m in model.modules())  # SMCADETR has no speed flags
    keys = model.state_dict().keys()

    def count(m, cls):
        return sum(isinstance(x, cls) for x in m.modules())

    only_bn = optimize_for_training(
        copy.deepcopy(model), fast_cpu_stem=False, fast_cpu_dropout=False, channels_last=False
    )
    assert count(only_bn, FrozenBNConv2d) == 1 + 8 * 2 + 3 and not count(only_bn, (FastCPUStem, FastCPUDropout))
    fast = optimize_for_training(copy.deepcopy(model))  # the defaults of train.speedups
    assert count(fast.backbone, FrozenBNConv2d) == 1 + 8 * 2 + 3
    assert isinstance(fast.backbone.stem, FastCPUStem)
    # encoder: 3 dropouts + self-attention; decoder: 4 dropouts + self- and co-attention, per layer
    assert count(fast, FastCPUDropout) == 3 + 2 * 4
    assert count(fast, FastDropoutMultiheadAttention) == 1 + 2 and count(fast, FastDropoutCoAttention) == 2
    assert fast.state_dict().keys() == keys
    assert not fast.backbone._forward_pre_hooks
    assert fast.backbone.stem.conv1.weight.is_contiguous()
    cl = optimize_for_training(copy.deepcopy(model), channels_last=True)
    assert cl.backbone.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(cl.backbone._forward_pre_hooks) == 1
    optimize_for_training(cl, channels_last=True)  # applying twice changes nothing more
    assert len(cl.backbone._forward_pre_hooks) == 1

    model.eval()
    fast.eval()
    image = torch.rand(3, 64, 96) * 255
    with torch.no_grad():
        a, b = (m([{"image": image}])[0]["instances"] for m in (model, fast))
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, rtol=1e-4, atol=1e-3)


def test_apply_speedups_reads_train_speedups_and_refuses_unknown_options():
    model = _r18_smca_with_frozen_bn()
    trained = apply_speedups(
        copy.deepcopy(model), {"fast_cpu_dropout": False, "keep_freed_cpu_memory": False}, device="cpu", training=True
    )
    assert isinstance(trained.backbone.stem, FastCPUStem)
    assert not any(isinstance(m, FastCPUDropout) for m in trained.modules())
    evaluated = apply_speedups(copy.deepcopy(model), None, device="cpu", training=False)
    assert not evaluated.training
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in evaluated.backbone.modules())  # folded
    with pytest.raises(ValueError, match=r"unknown train.speedups option\(s\) \['fuse_frozen_batchnorm'\]"):
        apply_speedups(model, {"fuse_frozen_batchnorm": True}, device="cpu", training=True)


def _max_pool_inputs(monkeypatch):
    """Record, for every ``F.max_pool2d`` call, whether its input was channels-last."""
    calls = []
    max_pool2d = torch.nn.functional.max_pool2d

    def recording(x, *args, **kwargs):
        calls.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return max_pool2d(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "max_pool2d", recording)
    return calls


def test_fast_cpu_stem_pools_channels_last_with_the_same_outputs(monkeypatch):
    model = _resnet(freeze_at=2)  # a frozen stem, as in the R50 configs
    fast = copy.deepcopy(model)
    assert use_fast_cpu_stem(fast) == 1 and use_fast_cpu_stem(fast) == 0
    assert fast.state_dict().keys() == model.state_dict().keys()
    calls = _max_pool_inputs(monkeypatch)
    x = torch.randn(2, 3, 66, 97)  # odd sizes: the pool's padding matters
    ref, out = model.stem(x), fast.stem(x)
    assert calls == [False, True]  # BasicStem pools the contiguous map, FastCPUStem channels-last
    assert out.is_contiguous() and out.shape == ref.shape == (2, 64, 17, 25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # The pool itself is exact: the same values as pooling the conv output in the default layout.
    conv = torch.relu(fast.stem.conv1(x.contiguous(memory_format=torch.channels_last)))
    assert torch.equal(out, torch.nn.functional.max_pool2d(conv.contiguous(), 3, 2, 1))
    whole_ref, whole = model(x), fast(x)
    for k in whole_ref:
        torch.testing.assert_close(whole[k], whole_ref[k], rtol=1e-4, atol=1e-4 * float(whole_ref[k].abs().max()))
    # A trainable stem, a channels-last input: BasicStem's path, unchanged.
    calls.clear()
    trainable = _resnet(freeze_at=0)
    use_fast_cpu_stem(trainable)
    assert torch.equal(trainable.stem(x), BasicStem.forward(trainable.stem, x))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast.stem(x_cl), BasicStem.forward(fast.stem, x_cl))
    assert calls == [False, False, True, True]  # channels-last only because the input was
    # Channels-last weights (optimize_for_inference on the CPU): the conv already returns
    # channels-last, and the stem leaves it so for the channels-last convolutions after it.
    calls.clear()
    optimized = optimize_for_inference(copy.deepcopy(fast))
    with torch.no_grad():
        out_cl = optimized.stem(x)
    assert calls == [True] and out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, ref.detach(), rtol=1e-4, atol=1e-4)


def test_optimize_for_inference_channels_last():
    model = _resnet()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = optimize_for_inference(model)(x)
    conv = model.stem.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for k in ref:
        assert torch.allclose(out[k], ref[k], rtol=1e-4, atol=1e-4 * ref[k].abs().max()), k


def test_channels_last_model_gives_the_same_outputs_and_losses():
    import os

    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import Boxes, Instances

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = LazyConfig.load(os.path.join(repo, "configs", "common", "r18_synthetic.py")).model
    cfg.transformer.decoder.dropout = 0.0
    torch.manual_seed(0)
    plain = instantiate(cfg)
    fast = optimize_for_training(copy.deepcopy(plain), channels_last=True)
    assert fast.backbone.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    image = torch.rand(3, 96, 128) * 255
    inst = Instances((96, 128), gt_boxes=Boxes(torch.tensor([[10.0, 20.0, 60.0, 70.0]])), gt_classes=torch.tensor([1]))
    losses = [sum(m([{"image": image, "instances": inst}]).values()) for m in (plain, fast)]
    assert torch.allclose(losses[0], losses[1], rtol=1e-4)
    losses[1].backward()  # gradients flow through the channels-last backbone
    assert fast.backbone.stem.conv1.weight.grad is not None
    plain.eval(), fast.eval()
    with torch.no_grad():
        a, b = (m([{"image": image}])[0]["instances"] for m in (plain, fast))
    assert torch.allclose(a.scores, b.scores, atol=1e-4)
