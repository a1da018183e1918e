"""Multi-process training on the CPU (GLOO). Two "machines" forming one job, and what happens when
one of their processes is lost: tests/reliability/test_distributed_faults.py."""

import json

import pytest
import torch
from test_train_net import run_train_net, tiny_overrides


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    return {m["iteration"]: m for m in rows if "loss_class" in m}


# Same total batch and seed in 1 and 2 processes. What legitimately depends on how the batch is
# split is taken out of the comparison: no dropout, frozen BN (plain BN would normalize over 2
# images per process instead of 4), and images of one size (a CNN's features near an image's
# border depend on how far the batch is padded beyond it).
DETERMINISTIC = [
    "train.seed=7",
    "dataloader.train.total_batch_size=4",
    "dataloader.train.aspect_ratio_grouping=False",
    "dataloader.train.mapper.augmentations=[]",
    "model.transformer.decoder.dropout=0.0",
    "model.backbone.stem.norm=FrozenBN",
    "model.backbone.stages.norm=FrozenBN",
    "train.max_iter=4",
    "train.eval_period=0",
]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    results = {}
    for num_procs in (1, 2):
        out = tmp_path / f"out{num_procs}"
        run = run_train_net(
            tmp_path, "--num-gpus", str(num_procs), *tiny_overrides(out), *DETERMINISTIC, check=False, size_jitter=0
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert (out / "model_final.pth").is_file()
        results[num_procs] = losses(out)
    assert sorted(results[1]) == sorted(results[2]) == [0, 1, 2, 3]
    # metrics.json holds running medians of the losses; the weights after 4 steps are the sharper
    # check that every step (gradients averaged by DDP, clipping, AdamW) matched.
    final = [torch.load(tmp_path / f"out{n}" / "model_final.pth", weights_only=True)["model"] for n in (1, 2)]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:
        torch.testing.assert_close(final[0][key], final[1][key], atol=2e-5, rtol=1e-4, msg=key)
    for it in range(4):
        for key in ("total_loss", "loss_class", "loss_bbox", "loss_giou"):
            a, b = results[1][it][key], results[2][it][key]
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (it, key, a, b)
    with open(tmp_path / "loss_comparison.json", "w") as f:
        json.dump(results, f)
