"""The model on CUDA: float32 attention logits under float16 autocast, frozen batch norms folded
and fused on cuDNN, batched inference equal to one image at a time, and LazyPredictor. Skipped
without a CUDA device (``pytest -m cuda``; tools/gpu_check.sh runs them)."""

import copy

import numpy as np
import torch
from conftest import load_script
from cuda_helpers import CUDA_MARKS, exact_float32, tiny_config, tiny_model_and_batch

from smca_d2.inference import LazyPredictor
from smca_d2.modeling import SpatiallyModulatedCoAttention, gaussian_log_weights
from smca_d2.speedups import fold_frozen_batchnorm, fuse_frozen_batchnorm

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate

pytestmark = CUDA_MARKS


def _recording_attend(monkeypatch):
    """Record the dtypes of every co-attention's q, k, v and bias."""
    seen = []
    original = SpatiallyModulatedCoAttention.attend

    def attend(self, q, k, v, bias, dropout_p):
        seen.append((q.dtype, k.dtype, v.dtype, None if bias is None else bias.dtype))
        return original(self, q, k, v, bias, dropout_p)

    monkeypatch.setattr(SpatiallyModulatedCoAttention, "attend", attend)
    return seen


def test_coattention_computes_in_float32_under_float16_autocast(monkeypatch):
    seen = _recording_attend(monkeypatch)
    torch.manual_seed(0)
    attn = SpatiallyModulatedCoAttention(64, 8).cuda().eval()
    h, w, q = 12, 16, 20
    query, key = torch.randn(2, q, 64, device="cuda"), torch.randn(2, h * w, 64, device="cuda")
    centers = torch.rand(2, 8, q, 2, device="cuda") * torch.tensor([w, h], device="cuda")
    scales = torch.rand(2, 8, q, 2, device="cuda") + 0.5
    bias = gaussian_log_weights(centers, scales, (h, w), beta=8.0)
    with torch.autocast("cuda", dtype=torch.float16):
        out = attn(query, key, key, [bias], [h * w])
    assert seen == [(torch.float32,) * 4]
    assert out.dtype == torch.float16  # the projections run in float16
    with exact_float32():
        expected = attn(query, key, key, [bias], [h * w])
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


def test_the_model_under_autocast_keeps_float32_attention(monkeypatch):
    seen = _recording_attend(monkeypatch)
    _, model, batch = tiny_model_and_batch()
    with torch.autocast("cuda", dtype=torch.float16):
        losses = model(batch)
    assert seen and all(dtypes == (torch.float32,) * 4 or dtypes[3] is None for dtypes in seen)
    assert all(torch.isfinite(v) for v in losses.values())


def test_frozen_batchnorm_folding_and_fusion_on_cudnn():
    """Folded (inference) and fused (training) frozen batch norms give the outputs of the plain
    ResNet to float32 rounding, and the fused one its gradients (float64, where cuDNN rounds less)."""
    frozen_bn_tests = load_script("tests/speedups/test_frozen_bn.py")
    model = frozen_bn_tests._resnet(freeze_at=2).cuda()
    x = torch.randn(2, 3, 128, 160, device="cuda")
    with exact_float32():
        ref = model(x)
        fused = copy.deepcopy(model)
        assert fuse_frozen_batchnorm(fused) == 1 + 8 * 2 + 3
        out = fused(x)
        folded = copy.deepcopy(model).eval()
        assert fold_frozen_batchnorm(folded) == 1 + 8 * 2 + 3
        with torch.no_grad():
            out_folded = folded(x)
    for k in ref:
        scale = float(ref[k].detach().abs().max())
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(out_folded[k], ref[k].detach(), rtol=1e-4, atol=1e-4 * scale)
    # With torch's defaults (TF32 in cuDNN) the folded model stays close to the plain one too.
    with torch.no_grad():
        ref_tf32, folded_tf32 = model(x), folded(x)
    for k in ref_tf32:
        scale = float(ref_tf32[k].abs().max())
        torch.testing.assert_close(folded_tf32[k], ref_tf32[k], rtol=1e-2, atol=1e-2 * scale)
    model64, fused64 = copy.deepcopy(model).double(), copy.deepcopy(fused).double()
    for m in (model64, fused64):
        sum(o.square().mean() for o in m(x.double()).values()).backward()
    params = dict(model64.named_parameters())
    trained = [(n, p) for n, p in fused64.named_parameters() if p.requires_grad]
    assert trained
    for name, p in trained:
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-7, atol=1e-10)


def test_batched_inference_equals_one_image_at_a_time_on_cuda():
    """As tests/modeling/test_smca_model.py on the CPU: patch convolutions without bias make a
    padded image's features those of the image alone, so batching must not change detections."""
    model_tests = load_script("tests/modeling/test_smca_model.py")
    for name in ("smca_single_scale_r50_50ep.py", "smca_multi_scale_r50_50ep.py"):
        cfg = model_tests.shrink(model_tests.load_model_cfg(name))
        cfg.backbone = model_tests.PatchBackbone()
        torch.manual_seed(0)
        model = instantiate(cfg).cuda().eval()
        inputs = model_tests.make_inputs([(64, 192), (192, 128), (128, 128)], with_instances=False)
        with exact_float32(), torch.no_grad():
            batched = model(inputs)
            single = [model([x])[0] for x in inputs]
        for b, s in zip(batched, single):
            b, s = b["instances"], s["instances"]
            assert b.pred_boxes.tensor.device.type == "cuda"
            torch.testing.assert_close(b.scores, s.scores, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b.pred_boxes.tensor, s.pred_boxes.tensor, atol=1e-3, rtol=1e-5)
            assert torch.equal(b.pred_classes, s.pred_classes)


def test_lazy_predictor_on_cuda(tmp_path):
    """LazyPredictor on CUDA (its inference speed-ups applied) computes what it computes on the CPU."""
    cfg = tiny_config()
    torch.manual_seed(1)
    DetectionCheckpointer(instantiate(cfg.model), save_dir=str(tmp_path)).save("tiny")
    path = str(tmp_path / "tiny.pth")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(90, 120, 3), dtype=np.uint8)
    on_gpu = LazyPredictor(tiny_config(), path, device="cuda")
    on_cpu = LazyPredictor(tiny_config(), path, device="cpu")
    assert next(on_gpu.model.parameters()).device.type == "cuda" and not on_gpu.model.training
    instances = on_gpu(image)["instances"]
    assert instances.image_size == (90, 120) and 0 < len(instances) <= on_gpu.model.test_topk
    assert instances.pred_boxes.tensor.device.type == "cuda"
    with exact_float32(), torch.no_grad():
        outputs = [p.model.forward_outputs(p.model.preprocess_image([p.preprocess(image)])) for p in (on_gpu, on_cpu)]
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[0][key].cpu(), outputs[1][key], atol=1e-4, rtol=1e-4)
