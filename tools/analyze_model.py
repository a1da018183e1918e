#!/usr/bin/env python
"""FLOPs, parameter counts and structure of a LazyConfig model (Detectron2's analyze_model).

    python tools/analyze_model.py --config-file configs/smca_single_scale_r50_50ep.py \
        --tasks flop parameter --size 800 1066 --output analysis.json [--opts key=value ...]

``flop``: detectron2's ``FlopCountAnalysis`` (fvcore's on a small wrapper with detectron2 v0.6,
whose ``detectron2.utils.analysis`` cannot be imported: see ``smca_d2.compat.flop_count_analysis``)
on the model in eval mode, run on ``--num-inputs`` random images of ``--size H W`` (batch of one
each; the mean is reported). fvcore counts one fused multiply-add as one flop.
``aten::scaled_dot_product_attention``
(all attention in this code) has no fvcore counter: it is counted here as
``batch * heads * L * S * (E + Ev)`` (the two matrix products). Every op that is *not* counted
is listed in the output (elementwise ops, by convention, and ops without a formula).

``parameter``: total and trainable counts and ``fvcore.nn.parameter_count_table``.
``structure``: ``print(model)``.
"""

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from typing import Dict, List

import torch
from fvcore.nn import flop_count_table, parameter_count, parameter_count_table
from fvcore.nn.jit_handles import get_shape
from torch import nn

import smca_d2  # noqa: F401  (compatibility fixes, registrations)
from smca_d2.compat import flop_count_analysis
from smca_d2.engine import load_config

from detectron2.config import instantiate

# Elementwise / reduction / indexing ops: not counted, by the usual convention (as in detectron2).
ELEMENTWISE_OPS = {
    "aten::__or__",
    "aten::abs",
    "aten::add",
    "aten::add_",
    "aten::argmax",
    "aten::argsort",
    "aten::clamp_min",
    "aten::cos",
    "aten::cumsum",
    "aten::div",
    "aten::div_",
    "aten::exp",
    "aten::fill_",
    "aten::log",
    "aten::log2",
    "aten::masked_fill_",
    "aten::max_pool2d",
    "aten::meshgrid",
    "aten::minimum",
    "aten::maximum",
    "aten::mul",
    "aten::mul_",
    "aten::neg",
    "aten::pad",
    "aten::pow",
    "aten::reciprocal",
    "aten::remainder",
    "aten::rsub",
    "aten::sigmoid",
    "aten::sigmoid_",
    "aten::sin",
    "aten::softmax",
    "aten::sort",
    "aten::sqrt",
    "aten::square",
    "aten::sub",
    "aten::topk",
    "aten::relu",
    "aten::relu_",
    "aten::rsqrt",
    "aten::lt",
    "aten::le",
    "aten::ne",
    "aten::where",
}


def sdpa_flop_jit(inputs, outputs) -> int:
    """FLOPs of ``scaled_dot_product_attention(q, k, v, ...)``: ``q k^T`` and ``attn v``."""
    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::_scaled_dot_product_attention_math": sdpa_flop_jit,
    "aten::_scaled_dot_product_flash_attention_for_cpu": sdpa_flop_jit,
}


def count_flops(model: nn.Module, size, num_inputs: int = 1, seed: int = 0, max_depth: int = 3) -> Dict:
    """FLOPs of the model (eval mode) on random images of ``size`` (H, W).

    Returns:
        a dict: ``total`` (mean over inputs), ``by_operator``, ``by_module`` (top levels),
        ``not_counted`` (op -> occurrences per input), ``table`` (fvcore's table).
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    totals, by_operator, by_module, not_counted, table = [], Counter(), Counter(), Counter(), ""
    for _ in range(num_inputs):
        image = torch.rand(3, *size, generator=generator).to(model.device) * 255
        analysis = flop_count_analysis(model, image).set_op_handle(**EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        # Traced with autograd on: under no_grad, nn.MultiheadAttention may take its fused fast
        # path (aten::_native_multi_head_attention), which fvcore cannot count.
        totals.append(analysis.total())
        by_operator.update(analysis.by_operator())
        modules = analysis.by_module()
        not_counted.update(analysis.unsupported_ops())
        by_module.update(
            {k[len("model.") :]: v for k, v in modules.items() if k.startswith("model.") and k.count(".") <= max_depth}
        )
        if not table:
            table = flop_count_table(analysis, max_depth=max_depth)
    mean = lambda c: {k: v / num_inputs for k, v in sorted(c.items(), key=lambda kv: -kv[1])}
    return {
        "total": sum(totals) / num_inputs,
        "by_operator": mean(by_operator),
        "by_module": mean(by_module),
        "not_counted": {
            "elementwise (by convention)": mean({k: v for k, v in not_counted.items() if k in ELEMENTWISE_OPS}),
            "no flop formula": mean({k: v for k, v in not_counted.items() if k not in ELEMENTWISE_OPS}),
        },
        "table": table,
    }


def count_parameters(model: nn.Module, max_depth: int = 3) -> Dict:
    counts = parameter_count(model)
    return {
        "total": int(counts[""]),
        "trainable": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "by_module": {k: int(v) for k, v in counts.items() if k and k.count(".") < max_depth},
        "table": parameter_count_table(model, max_depth=max_depth),
    }


def _format_ops(ops: Dict[str, float]) -> str:
    return ", ".join(f"{k} x{v:g}" for k, v in ops.items()) or "none"


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=["flop", "parameter", "structure"],
        default=["flop", "parameter"],
        help="what to report (default: flop parameter)",
    )
    parser.add_argument("--num-inputs", type=int, default=1, help="random images to average FLOPs over (1)")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"), help="image size")
    parser.add_argument("--max-depth", type=int, default=3, help="module depth of the tables (3)")
    parser.add_argument("--device", default="cpu", help="device to run the model on (cpu)")
    parser.add_argument("--output", help="JSON file to write the results to")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser


def main(argv: List[str] = None) -> Dict:
    args = get_parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    model = instantiate(cfg.model).to(args.device).eval()
    results = {"config": args.config_file, "overrides": list(args.opts)}

    if "structure" in args.tasks:
        print(model)
        results["structure"] = str(model)
    if "parameter" in args.tasks:
        params = count_parameters(model, args.max_depth)
        print(params["table"])
        print(f"parameters: {params['total']:,} total, {params['trainable']:,} trainable")
        results["parameters"] = params
    if "flop" in args.tasks:
        start = time.perf_counter()
        flops = count_flops(model, tuple(args.size), args.num_inputs, max_depth=args.max_depth)
        flops.update(size=list(args.size), num_inputs=args.num_inputs, seconds=round(time.perf_counter() - start, 2))
        print(flops["table"])
        print("by operator (GFLOPs): " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in flops["by_operator"].items()))
        for reason, ops in flops["not_counted"].items():
            print(f"not counted, {reason}: {_format_ops(ops)}")
        print(
            f"FLOPs at {args.size[0]}x{args.size[1]}: {flops['total'] / 1e9:.2f} G "
            f"(fvcore convention: 1 multiply-add = 1 flop; mean of {args.num_inputs} input(s))"
        )
        results["flops"] = flops

    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
