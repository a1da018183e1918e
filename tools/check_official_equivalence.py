#!/usr/bin/env python
"""Check that smca_d2's single-scale SMCA computes what the official code computes.

    python tools/check_official_equivalence.py --official-repo /tmp/smca_official
        [--image photo.jpg] [--device cpu] [--threads 1] [--output results.json]

``--official-repo`` is a work tree of gaopengcuhk/SMCA-DETR; its ``models`` and ``util`` packages
are imported from there at run time (nothing of it is copied). The script

1. builds the official single-scale R50 model (``dynamic_scale="type3"``, ``smooth=8``, 300
   queries, 6+6 layers) without downloading any weights, with seeded random weights: every
   constant-initialised tensor (LayerNorm, biases, the scale head, frozen BN) is perturbed and the
   frozen-BN statistics are calibrated on a random image, so that every tensor of the mapping
   matters and activations stay in a realistic range;
2. saves it as the official ``main.py`` does (``{"model", "args", "epoch"}``), reads it back with
   :func:`smca_d2.checkpoint.load_official_checkpoint` and converts it with
   :func:`convert_official_state_dict` (``num_classes`` 92: every column, and 80);
3. loads the result into the model of ``--config`` and runs both models in eval mode on the same
   image (a deterministic synthetic 3x480x640 image, or ``--image``) and on a batch of two images
   of different sizes (padded by both), comparing the raw outputs of every decoder layer
   (``pred_logits``, ``pred_boxes``) and the top-300 detections (scores, labels, boxes in pixels).

Differences are printed with PASS/FAIL at ``--tol`` (1e-4) and written to ``--output`` (JSON):
logits, normalized boxes and scores are held to ``tol``, detection boxes in pixels to
``tol * max(H, W)`` (float32 itself resolves only ~6e-5 px at 640). Detections whose scores tie to
float rounding may trade ranks; such swaps are matched up and counted. A negative control (one
mapping deliberately broken) must fail, showing that the check can fail. Exit status 0 if
everything passes.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from official_harness import build_official_model, run_official, synthetic_image  # tools/, next to this script

import smca_d2  # noqa: F401  (detectron2 compatibility fixes)
from smca_d2.checkpoint import (
    check_complete,
    coco_contiguous_category_ids,
    convert_official_state_dict,
    load_official_checkpoint,
)
from smca_d2.model_zoo import resolve_config_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "smca_single_scale_r50_50ep.py")
TOPK = 300  # the official evaluation: top-k over query x class scores, k = num_queries


# --------------------------------------------------------------------------- smca_d2
def build_our_model(config: str, num_classes: int, state_dict, device: str):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(resolve_config_file(config))
    cfg.model.num_classes = num_classes
    model = instantiate(cfg.model)
    report = check_complete(state_dict, model)
    if not report.ok:
        raise RuntimeError(f"converted state dict does not fit {config}:\n{report}")
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


def run_ours(model, images, device):
    inputs = [{"image": img.to(device), "height": img.shape[-2], "width": img.shape[-1]} for img in images]
    with torch.no_grad():
        raw = model.forward_outputs(model.preprocess_image(inputs))
        sizes = [tuple(img.shape[-2:]) for img in images]
        unclipped = model.inference(raw["pred_logits"], raw["pred_boxes"], sizes)
        final = model(inputs)
    return raw, unclipped, [r["instances"] for r in final]


# --------------------------------------------------------------------------- comparison
def _layers(outputs):
    return [outputs] + list(reversed(outputs.get("aux_outputs", [])))  # last layer first


def official_topk(logits, boxes, sizes, columns, k):
    """The top-k detections of the official outputs over the given class columns (the rule of
    the official PostProcess, sorted by score): per image (scores, labels, boxes_xyxy_pixels)."""
    logits = logits[..., columns]
    c = logits.shape[-1]
    scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
    results = []
    for i, (h, w) in enumerate(sizes):
        q = torch.div(index[i], c, rounding_mode="floor")
        cx, cy, bw, bh = boxes[i, q].unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
        xyxy = xyxy * torch.tensor([w, h, w, h], dtype=xyxy.dtype, device=xyxy.device)
        results.append((scores[i], index[i] % c, xyxy))
    return results


def clip_and_filter(dets, h, w):
    """What Detectron2's detector_postprocess does: clip boxes to the image, drop empty ones."""
    scores, labels, boxes = dets
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return scores[keep], labels[keep], boxes[keep]


def _max(x):
    return float(x.abs().max()) if x.numel() else 0.0


def compare_detections(official, pool, ours, tol, box_tol):
    """Compare detections rank by rank.

    Two detections whose scores differ by float rounding only may trade ranks (or places at the
    top-k boundary); a rank whose label or box differs is therefore also matched against the
    official detections of ``pool`` (a longer top-k list) with the same label and a score within
    ``tol``, and counted in ``rank_swaps`` when that match is closer.
    """
    scores, labels, boxes = official
    pool_scores, pool_labels, pool_boxes = pool
    our_scores, our_labels, our_boxes = ours
    n = min(len(scores), len(our_scores))
    per_rank = (boxes[:n] - our_boxes[:n]).abs().amax(dim=1) if n else boxes.new_zeros(0)
    per_rank[labels[:n] != our_labels[:n]] = float("inf")
    swaps = 0
    for i in torch.nonzero(per_rank > box_tol).flatten().tolist():
        candidates = (pool_labels == our_labels[i]) & ((pool_scores - our_scores[i]).abs() <= tol)
        if candidates.any():
            best = (pool_boxes[candidates] - our_boxes[i]).abs().amax(dim=1).min()
            if best < per_rank[i]:
                per_rank[i] = best
                swaps += 1
    return {
        "count_official": int(len(scores)),
        "count_ours": int(len(our_scores)),
        "max_abs_score": _max(scores[:n] - our_scores[:n]),  # both sorted: robust to rank swaps
        "max_abs_box_px": float(per_rank.max()) if n else 0.0,
        "label_mismatches_by_rank": int((labels[:n] != our_labels[:n]).sum()),
        "rank_swaps": swaps,
    }


def compare(official_out, ours, sizes, num_classes, tol):
    raw, unclipped, final = ours
    # The official columns our classes come from: all 92, ids 0..90, or the 80 COCO ids.
    columns = {92: list(range(92)), 91: list(range(91))}.get(num_classes) or coco_contiguous_category_ids()
    off_layers, our_layers = _layers(official_out), _layers(raw)
    if len(off_layers) != len(our_layers):
        raise RuntimeError(f"{len(off_layers)} official decoder outputs vs {len(our_layers)} of ours")
    logits = [_max(o["pred_logits"][..., columns] - m["pred_logits"]) for o, m in zip(off_layers, our_layers)]
    boxes = [_max(o["pred_boxes"] - m["pred_boxes"]) for o, m in zip(off_layers, our_layers)]

    top = official_topk(official_out["pred_logits"], official_out["pred_boxes"], sizes, columns, TOPK)
    pool = official_topk(official_out["pred_logits"], official_out["pred_boxes"], sizes, columns, TOPK + 50)
    per_image = []
    for i, (h, w) in enumerate(sizes):
        # Pixel coordinates are normalized ones times the image side (float32 resolves ~6e-5 px at
        # 640): boxes are held to tol * max(H, W).
        box_tol = tol * max(h, w)
        u, f = unclipped[i], final[i]
        per_image.append(
            {
                "image_size": [h, w],
                "topk_unclipped": compare_detections(
                    top[i], pool[i], (u.scores, u.pred_classes, u.pred_boxes.tensor), tol, box_tol
                ),
                # Detectron2's detector_postprocess clips boxes to the image and drops empty ones.
                "final_instances": compare_detections(
                    clip_and_filter(top[i], h, w),
                    clip_and_filter(pool[i], h, w),
                    (f.scores, f.pred_classes, f.pred_boxes.tensor),
                    tol,
                    box_tol,
                ),
            }
        )

    def worst(field):
        return max(max(p["topk_unclipped"][field], p["final_instances"][field]) for p in per_image)

    det_boxes_rel = max(
        max(p["topk_unclipped"]["max_abs_box_px"], p["final_instances"]["max_abs_box_px"]) / max(h, w)
        for p, (h, w) in zip(per_image, sizes)
    )
    counts_ok = all(p["final_instances"]["count_ours"] == p["final_instances"]["count_official"] for p in per_image)
    summary = {
        "max_abs_logits": max(logits),
        "max_abs_boxes": max(boxes),
        "max_abs_logits_per_layer": logits,  # last layer first
        "max_abs_boxes_per_layer": boxes,
        "max_abs_det_scores": worst("max_abs_score"),
        "max_abs_det_boxes_px": worst("max_abs_box_px"),
        "max_abs_det_boxes_over_image_side": det_boxes_rel,
        "det_rank_swaps": worst("rank_swaps"),
        "logit_range": [float(official_out["pred_logits"].min()), float(official_out["pred_logits"].max())],
        "detections": per_image,
    }
    summary["pass"] = bool(
        summary["max_abs_logits"] <= tol
        and summary["max_abs_boxes"] <= tol
        and summary["max_abs_det_scores"] <= tol
        and det_boxes_rel <= tol
        and counts_ok
    )
    return summary


def load_image(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def make_images(image_path, seed):
    if image_path:
        first = load_image(image_path)
        h, w = first.shape[-2:]
        # A second image, narrower and taller (each image is padded in one direction): the
        # mirrored photo cropped to 5/6 of its width, with its top rows flipped below it.
        crop = first[:, :, : max(32, w * 5 // 6)].flip(-1)
        second = torch.cat([crop, crop[:, : max(8, h // 8)].flip(-2)], dim=1).contiguous()
        desc = f"{image_path} (3x{h}x{w}; batch: + a 3x{second.shape[-2]}x{second.shape[-1]} crop of it)"
        return first, second, desc
    first = synthetic_image(480, 640, seed)
    second = synthetic_image(544, 400, seed + 1)
    return first, second, "synthetic 3x480x640 (batch: + synthetic 3x544x400)"


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-repo", required=True, help="work tree of gaopengcuhk/SMCA-DETR")
    parser.add_argument("--image", default=None, help="an RGB photo (default: a synthetic image)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="smca_d2 config (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice; 1 is much faster on a busy CPU)",
    )
    return parser.parse_args(argv)


def _fmt(case, r):
    flag = "PASS" if r["pass"] else "FAIL"
    return (
        f"[{flag}] {case:<16} logits {r['max_abs_logits']:.3e}  boxes {r['max_abs_boxes']:.3e}  "
        f"det scores {r['max_abs_det_scores']:.3e}  det boxes {r['max_abs_det_boxes_px']:.3e} px "
        f"({r['max_abs_det_boxes_over_image_side']:.1e} of the image side; {r['det_rank_swaps']} rank swaps)"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    official, official_ns, misc = build_official_model(args.official_repo, args.device, args.seed)
    first, second, image_desc = make_images(args.image, args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "official.pth")
        # As the official main.py writes it (the `args` Namespace included).
        torch.save({"model": official.state_dict(), "args": official_ns, "epoch": 0}, path)
        official_sd = load_official_checkpoint(path)

    official_single = run_official(official, misc, [first], args.device)
    official_batch = run_official(official, misc, [first, second], args.device)
    sizes_single = [tuple(first.shape[-2:])]
    sizes_batch = sizes_single + [tuple(second.shape[-2:])]

    results = {
        "official_repo": os.path.abspath(args.official_repo),
        "config": os.path.relpath(args.config, REPO_ROOT),
        "device": args.device,
        "seed": args.seed,
        "image": image_desc,
        "tolerance": args.tol,
        "official_keys": len(official_sd),
        "cases": {},
    }
    for num_classes in (92, 80):
        converted = convert_official_state_dict(official_sd, num_classes=num_classes)
        ours = build_our_model(args.config, num_classes, converted, args.device)
        results["cases"][f"single_nc{num_classes}"] = compare(
            official_single, run_ours(ours, [first], args.device), sizes_single, num_classes, args.tol
        )
        results["cases"][f"batch2_nc{num_classes}"] = compare(
            official_batch, run_ours(ours, [first, second], args.device), sizes_batch, num_classes, args.tol
        )
        del ours

    # Negative control: the same check must fail when one mapping is wrong (here: the x/y
    # Gaussian scales of one decoder layer swapped), or it would prove nothing.
    converted = convert_official_state_dict(official_sd, num_classes=92)
    for suffix, shape in (("weight", (8, 2, -1)), ("bias", (8, 2))):
        key = f"transformer.decoder.layers.2.scale_head.{suffix}"
        converted[key] = converted[key].reshape(shape).flip(1).reshape(converted[key].shape).clone()
    control = compare(
        official_single,
        run_ours(build_our_model(args.config, 92, converted, args.device), [first], args.device),
        sizes_single,
        92,
        args.tol,
    )
    results["negative_control"] = {
        "perturbation": "x/y Gaussian scales of decoder layer 2 swapped",
        "max_abs_logits": control["max_abs_logits"],
        "max_abs_boxes": control["max_abs_boxes"],
        "detected": not control["pass"],
    }

    results["pass"] = all(c["pass"] for c in results["cases"].values()) and results["negative_control"]["detected"]
    results["seconds"] = round(time.time() - start, 1)
    print(f"image: {image_desc}; device {args.device}; tolerance {args.tol:g} (max abs differences)")
    for case, r in results["cases"].items():
        print(_fmt(case, r))
    nc = results["negative_control"]
    print(
        f"[{'PASS' if nc['detected'] else 'FAIL'}] negative control ({nc['perturbation']}): logits "
        f"{nc['max_abs_logits']:.3e}, boxes {nc['max_abs_boxes']:.3e}: "
        + ("detected" if nc["detected"] else "NOT detected: the check is not sensitive")
    )
    print("PASS" if results["pass"] else "FAIL")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.output}")
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
