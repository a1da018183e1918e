"""Denoising queries (smca_d2.modeling.denoising): how they are made, that the object queries
never see them, and their losses."""

import os
import re
import shutil

import pytest
import torch
from tiny_smca import REPO, rendered_batch, tiny_config

from smca_d2.engine import load_config
from smca_d2.modeling import DenoisingQueries, HungarianMatcher, SetCriterion

from detectron2.config import LazyCall as L
from detectron2.config import instantiate


def _targets(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in counts:
        centers = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
        sizes = 0.05 + 0.2 * torch.rand(n, 2, generator=g)
        targets.append({"labels": torch.randint(0, 5, (n,), generator=g), "boxes": torch.cat([centers, sizes], 1)})
    return targets


def test_queries_are_the_targets_with_noise_in_groups():
    torch.manual_seed(0)
    dn = DenoisingQueries(num_classes=5, d_model=64, num_groups=3, box_noise=0.4, label_noise=0.0)
    targets = _targets([2, 4, 0])
    batch = dn(targets, num_queries=10)
    assert batch.content.shape == batch.pos.shape == (3, 12, 64)  # 3 groups x the 4 targets of image 1
    assert batch.ref_logit.shape == (3, 12, 2)
    assert batch.valid.sum(1).tolist() == [6, 12, 0]
    for group in range(3):
        rows = slice(4 * group, 4 * group + 2)
        assert torch.equal(batch.boxes[0, rows], targets[0]["boxes"])
        assert torch.equal(batch.labels[0, rows], targets[0]["labels"])
    # The Gaussian centers are the noised centers: within box_noise / 2 of the box's size.
    centers = batch.ref_logit.sigmoid()
    shift = (centers - batch.boxes[..., :2]).abs()[batch.valid]
    assert (shift <= 0.2 * batch.boxes[..., 2:][batch.valid] + 1e-4).all()
    assert (shift > 0).all()
    # Without label noise the content is the embedding of the true label.
    assert torch.equal(batch.content[1], dn.label_embed(batch.labels[1]))


def test_without_noise_the_queries_are_the_targets_and_label_noise_flips_labels():
    torch.manual_seed(0)
    exact = DenoisingQueries(num_classes=5, d_model=32, box_noise=0.0, label_noise=0.0)
    targets = _targets([3])
    batch = exact(targets, num_queries=4)
    torch.testing.assert_close(batch.ref_logit.sigmoid()[0, :3], targets[0]["boxes"][:, :2])
    flipped = DenoisingQueries(num_classes=5, d_model=32, num_groups=50, label_noise=1.0)
    batch = flipped(targets, num_queries=4)
    noised = [flipped.label_embed.weight.detach().sub(c).abs().sum(1).argmin() for c in batch.content[0].detach()]
    changed = (torch.stack(noised) != batch.labels[0]).float().mean()
    assert 0.65 < changed < 0.95  # a random class: the true one 1 time in 5


def test_attention_mask_keeps_object_queries_and_groups_apart():
    dn = DenoisingQueries(num_classes=5, d_model=32, num_groups=2)
    batch = dn(_targets([1, 2]), num_queries=3)
    mask = batch.self_attn_mask  # [B, 3 + 2 * 2, 3 + 2 * 2], True: may not attend
    assert mask.shape == (2, 7, 7)
    assert mask[:, :3, 3:].all() and not mask[:, :, :3].any()  # everyone sees the object queries
    assert mask[:, 3:5, 5:].all() and mask[:, 5:, 3:5].all()  # the groups do not see each other
    assert not mask[1, 3:5, 3:5].any() and not mask[1, 5:, 5:].any()  # image 1: no padding
    # Image 0 has one target: its second query in each group is padding, attended by no other.
    assert mask[0, :, 4].tolist() == [True] * 4 + [False, True, True]
    assert not mask.all(-1).any()  # no query has every key masked


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        DenoisingQueries(num_classes=5, d_model=36)
    with pytest.raises(ValueError, match="num_groups"):
        DenoisingQueries(num_classes=5, d_model=32, num_groups=0)
    with pytest.raises(ValueError, match="box_noise"):
        DenoisingQueries(num_classes=5, d_model=32, box_noise=1.5)


def test_a_batch_without_targets_still_trains_every_parameter():
    _, with_dn = _models()
    batch = rendered_batch(2)
    for inputs in batch:
        inputs["instances"] = inputs["instances"][:0]
    losses = with_dn.train()(batch)
    assert losses["loss_bbox_dn"].item() == 0 and losses["loss_class_dn"].item() == 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in with_dn.denoising.parameters())  # as DDP needs


def _models():
    cfg = tiny_config()
    cfg.model.transformer.decoder.dropout = 0.0  # no random draws that the queries' noise would move
    torch.manual_seed(0)
    plain = instantiate(cfg.model)
    cfg.model.denoising = L(DenoisingQueries)(
        num_classes="${..num_classes}", d_model="${..transformer.decoder.d_model}", num_groups=2
    )
    torch.manual_seed(0)
    with_dn = instantiate(cfg.model)
    shared = {k: v for k, v in with_dn.state_dict().items() if not k.startswith("denoising.")}
    plain.load_state_dict(shared)
    return plain, with_dn


def test_object_queries_are_trained_and_run_as_without_denoising():
    plain, with_dn = _models()
    batch = rendered_batch(3)
    plain.train(), with_dn.train()
    losses, dn_losses = plain(batch), with_dn(batch)
    names = ("loss_class", "loss_bbox", "loss_giou")
    assert set(dn_losses) == set(losses) | {k.replace(n, n + "_dn") for k in losses for n in names if k.startswith(n)}
    for name, value in losses.items():  # the same up to float rounding (masked attention keys)
        torch.testing.assert_close(dn_losses[name], value, rtol=1e-5, atol=1e-6)
    sum(dn_losses.values()).backward()
    assert with_dn.denoising.label_embed.weight.grad.abs().sum() > 0
    assert with_dn.denoising.box_embed.layers[0].weight.grad.abs().sum() > 0
    plain.eval(), with_dn.eval()
    with torch.no_grad():
        a, b = plain(batch), with_dn(batch)
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_denoising_losses_compare_each_query_with_its_own_target():
    criterion = SetCriterion(num_classes=5, matcher=HungarianMatcher())
    labels = torch.tensor([[1, 3, 0]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.1, 0.3], [0.5, 0.5, 0.5, 0.5]]])
    valid = torch.tensor([[True, True, False]])
    logits = torch.full((2, 1, 3, 5), -10.0)
    logits[:, 0, 0, 1] = logits[:, 0, 1, 3] = 10.0
    exact = boxes.expand(2, -1, -1, -1).clone()
    exact[:, 0, 2] = torch.tensor([0.9, 0.9, 0.1, 0.1])  # a padding query: no loss whatever it predicts
    dn = {"pred_logits": logits, "pred_boxes": exact, "labels": labels, "boxes": boxes, "valid": valid}
    losses = criterion.denoising_losses({**dn, "num_groups": 1}, num_boxes=2.0)
    assert sorted(losses) == sorted(
        f"{n}{s}" for n in ("loss_class", "loss_bbox", "loss_giou") for s in ("_dn", "_dn_0")
    )
    assert all(v.item() < 1e-6 for v in losses.values())
    moved = exact.clone()
    moved[1, 0, 0, 0] += 0.1  # the last layer's first box, 0.1 off in x
    losses = criterion.denoising_losses({**dn, "pred_boxes": moved, "num_groups": 2}, num_boxes=2.0)
    torch.testing.assert_close(losses["loss_bbox_dn"], torch.tensor(5.0 * 0.1 / 4))  # weight 5, 2 boxes x 2 groups
    assert losses["loss_bbox_dn_0"].item() < 1e-6


def test_the_config_shown_in_getting_started_trains_with_denoising_queries(tmp_path):
    with open(os.path.join(REPO, "docs", "GETTING_STARTED.md")) as f:
        doc = f.read()
    snippet = re.search(
        r"```python\n(from detectron2.config import LazyCall as L\n\nfrom smca_d2.modeling import Denois.*?)```",
        doc,
        re.S,
    )
    assert snippet, "GETTING_STARTED.md no longer shows the denoising config"
    shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs")
    path = tmp_path / "configs" / "demo" / "with_denoising.py"
    path.write_text(snippet.group(1))
    cfg = load_config(str(path), ["model.transformer.decoder.num_layers=1", "model.num_queries=5"])
    model = instantiate(cfg.model).train()
    assert isinstance(model.denoising, DenoisingQueries) and model.denoising.num_groups == 3
    assert "loss_bbox_dn" in model(rendered_batch(2))
