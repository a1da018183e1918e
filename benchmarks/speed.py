#!/usr/bin/env python
"""Speed and memory of SMCA-DETR, side by side with the official implementation.

    python benchmarks/speed.py                                   # ours only (CPU)
    python benchmarks/speed.py --official-repo /path/to/SMCA-DETR  # + the official code
    python benchmarks/speed.py --device cuda --amp --official-repo ...

``--official-repo`` is a work tree of gaopengcuhk/SMCA-DETR; its ``models`` and ``util`` are
imported from there at run time (nothing of it is part of this repository).

What is measured, in one run (every measurement in its own fresh process, so that peak memory
belongs to one model and one task):

1. single-scale R50 SMCA, ours and official: inference time per image at each ``--sizes``
   (default 800x1066 and 800x1333), training time per iteration (``--train-batch`` images of
   ``--train-size``; forward, loss with Hungarian matching, backward, gradient clipping, AdamW
   step) and peak memory of each (CPU: peak resident set size above the level after the model is
   built, and the peak of the tensors one call allocates, from torch.profiler, which does not
   depend on malloc; GPU: ``torch.cuda.max_memory_allocated``); every variant runs in
   ``--inference-rounds`` / ``--train-rounds`` interleaved rounds, one process each (medians
   reported). Both models get the same random weights
   (the official ones, converted with smca_d2's converter, all 92 class columns) and the same
   inputs; the outputs of every decoder layer and the training losses are checked equal;
2. where the time goes (forward hooks): backbone, encoder, decoder, the Gaussian prior,
   matcher, backward + optimizer step, and what share of inference is the backbone (the limit
   of any speed-up of the rest);
   Ours is also run after :func:`smca_d2.modeling.fusion.optimize_for_inference` (frozen batch
   norms folded into the convolutions, channels-last backbone on the CPU; "optimized"), and
   trained with ``model.channels_last=True`` and (CPU) with torch's dropout masks
   (``model.fast_cpu_dropout=False``);
   On the CPU ours runs with :func:`smca_d2.engine.keep_freed_cpu_memory` as train_net.py and
   demo/demo.py do, the official code as its main.py runs (glibc defaults) and once more with the
   same malloc setting as ours ("official, same malloc"): the code-only comparison;
3. our multi-scale SMCA and DETR baseline (inference and training);
4. how inference time grows with the image size and the number of queries (ours and official).

Prints tables and writes JSON (``--output``) and a PNG next to it; ``--replot JSON`` redraws
both from an earlier run.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

CONFIGS = {
    "smca_single_scale": "configs/smca_single_scale_r50_50ep.py",
    "smca_multi_scale": "configs/smca_multi_scale_r50_50ep.py",
    "detr_baseline": "configs/detr_baseline_r50_50ep.py",
}
NUM_CLASS_COLUMNS = 92  # the official head: every COCO id + "no object"; ours converted with all


# =========================================================================== worker (one task)
def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field}:\s+(\d+)", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _images(count, size, seed=0):
    from smca_d2.checkpoint.official_code import synthetic_image

    h, w = size
    return [synthetic_image(h, w, seed + i) for i in range(count)]


def _targets(count, size, seed=0):
    """Seeded random boxes (pixels, XYXY) and official class ids (1..90, COCO ids in use)."""
    import torch

    from smca_d2.checkpoint import coco_contiguous_category_ids

    ids = torch.tensor(coco_contiguous_category_ids())
    gen = torch.Generator().manual_seed(seed + 100)
    h, w = size
    boxes, labels = [], []
    for _ in range(count):
        n = 6
        cxcy = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
        wh = (torch.rand(n, 2, generator=gen) * 0.4 + 0.05) * torch.tensor([w, h])
        xyxy = torch.cat([cxcy - wh / 2, cxcy + wh / 2], dim=1)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        boxes.append(xyxy)
        labels.append(ids[torch.randint(len(ids), (n,), generator=gen)])
    return boxes, labels


class _Impl:
    """A model (ours or the official one) behind one interface: inference and a training step."""

    def __init__(self, spec):
        import torch

        self.spec, self.device = spec, spec["device"]
        torch.manual_seed(spec.get("seed", 0))
        if spec["impl"] == "official":
            from smca_d2.checkpoint.official_code import build_official_model

            overrides = {"num_queries": spec["num_queries"]} if spec.get("num_queries") else {}
            self.model, self.criterion, self.args, self.misc = build_official_model(
                spec["official_repo"], self.device, spec.get("seed", 0), randomize=False,
                with_criterion=True, **overrides,
            )
            if spec.get("official_checkpoint"):
                sd = torch.load(spec["official_checkpoint"], map_location="cpu", weights_only=False)["model"]
                self.model.load_state_dict(sd)
            from smca_d2.checkpoint.official_code import import_official

            self.postprocess = import_official(spec["official_repo"])[1].PostProcess()
        else:
            from detectron2.config import instantiate

            from smca_d2.engine import load_config

            cfg = load_config(os.path.join(REPO_ROOT, CONFIGS[spec["model"]]), [])
            cfg.model.num_classes = NUM_CLASS_COLUMNS
            if spec.get("num_queries"):
                cfg.model.num_queries = spec["num_queries"]
            if spec.get("channels_last"):
                cfg.model.channels_last = True
            if spec.get("torch_dropout"):
                cfg.model.fast_cpu_dropout = False
            self.model = instantiate(cfg.model).to(self.device).eval()
            if spec.get("official_checkpoint"):
                from smca_d2.checkpoint import convert_official_state_dict, load_official_checkpoint

                sd = convert_official_state_dict(
                    load_official_checkpoint(spec["official_checkpoint"]), num_classes=NUM_CLASS_COLUMNS
                )
                self.model.load_state_dict(sd, strict=True)
            if spec.get("optimize"):
                from smca_d2.modeling.fusion import optimize_for_inference

                optimize_for_inference(self.model)
            self.cfg = cfg

    # ---- inference
    def infer(self, images):
        import torch

        with torch.no_grad(), self._autocast():
            if self.spec["impl"] == "official":
                from smca_d2.checkpoint.official_code import run_official

                out = run_official(self.model, self.misc, images, self.device)
                sizes = torch.tensor([img.shape[-2:] for img in images], device=self.device)
                return self.postprocess(out, sizes)  # the official top-100 and boxes in pixels
            inputs = [{"image": img.to(self.device), "height": img.shape[-2], "width": img.shape[-1]}
                      for img in images]
            return self.model(inputs)  # the path users run: top-100, Instances in pixels

    def raw_outputs(self, images):
        """Every decoder layer's (logits, boxes), last layer first, as float32 CPU tensors."""
        import torch

        with torch.no_grad():
            if self.spec["impl"] == "official":
                from smca_d2.checkpoint.official_code import run_official

                out = run_official(self.model, self.misc, images, self.device)
            else:
                inputs = [{"image": img.to(self.device)} for img in images]
                out = self.model.forward_outputs(self.model.preprocess_image(inputs))
        layers = [out] + list(reversed(out.get("aux_outputs", [])))
        return [(o["pred_logits"].float().cpu(), o["pred_boxes"].float().cpu()) for o in layers]

    # ---- training
    def setup_training(self, images, boxes, labels):
        import torch

        self.model.train()
        if self.spec["impl"] == "official":
            from smca_d2.checkpoint.official_code import official_samples, official_targets

            self.samples = official_samples(self.misc, images, self.device)
            self.targets = official_targets(images, boxes, labels, device=self.device)
            a = self.args
            groups = [
                {"params": [p for n, p in self.model.named_parameters() if "backbone" not in n and p.requires_grad]},
                {"params": [p for n, p in self.model.named_parameters() if "backbone" in n and p.requires_grad],
                 "lr": a.lr_backbone},
            ]
            self.optimizer = torch.optim.AdamW(groups, lr=a.lr, weight_decay=a.weight_decay)
        else:
            from detectron2.config import instantiate
            from detectron2.structures import Boxes, Instances

            self.inputs = []
            for img, b, lab in zip(images, boxes, labels):
                inst = Instances(tuple(img.shape[-2:]))
                inst.gt_boxes = Boxes(b.clone())
                inst.gt_classes = lab.clone()
                self.inputs.append({"image": img, "instances": inst})
            self.cfg.optimizer.params.model = self.model
            self.optimizer = instantiate(self.cfg.optimizer)
        self.scaler = torch.amp.GradScaler("cuda") if self.spec.get("amp") else None

    def loss(self):
        """The total weighted loss of the current weights (graph kept)."""
        with self._autocast():
            if self.spec["impl"] == "official":
                outputs = self.model([self.samples, self.targets])
                loss_dict = self.criterion(outputs, self.targets)
                w = self.criterion.weight_dict
                return sum(loss_dict[k] * w[k] for k in loss_dict if k in w)
            return sum(self.model(self.inputs).values())

    def train_step(self):
        return self.step(self.loss())

    def step(self, loss) -> float:
        """Backward, gradient clipping and the optimizer step for ``loss``; returns its value."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.spec["impl"] == "official":
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_max_norm)
            self.scaler.step(self.optimizer)  # ours clips inside step(), after unscaling
            self.scaler.update()
        else:
            loss.backward()
            if self.spec["impl"] == "official":
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_max_norm)
            self.optimizer.step()
        return float(loss)

    @contextmanager
    def _autocast(self):
        import torch

        if self.spec.get("amp") and self.device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.float16):
                yield
        else:
            yield

    # ---- where the time goes
    def parts(self):
        """Submodules timed by the profile: name -> module."""
        if self.spec["impl"] == "official":
            m = self.model
            return {"backbone": m.backbone, "encoder": m.transformer.encoder,
                    "decoder": m.transformer.decoder, "matcher": self.criterion.matcher}
        m = self.model
        return {"backbone": m.backbone, "encoder": m.transformer.encoder,
                "decoder": m.transformer.decoder, "matcher": m.criterion.matcher}


@contextmanager
def _timing_hooks(impl: _Impl, totals: Dict[str, float]):
    """Accumulate wall time spent in each part (forward) into ``totals``."""
    handles, starts = [], {}
    device = impl.device

    for name, module in impl.parts().items():
        def pre(_m, _inp, name=name):
            _sync(device)
            starts[name] = time.perf_counter()

        def post(_m, _inp, _out, name=name):
            _sync(device)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - starts.pop(name)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    def timing(original):
        def timed(*a, **k):
            _sync(device)
            t0 = time.perf_counter()
            out = original(*a, **k)
            _sync(device)
            totals["gaussian_prior"] = totals.get("gaussian_prior", 0.0) + time.perf_counter() - t0
            return out

        return timed

    try:
        if impl.spec["impl"] == "ours":
            from smca_d2.inference.gaussian_maps import wrapped_gaussian_log_weights

            with wrapped_gaussian_log_weights(timing):
                yield
        else:
            yield
    finally:
        for h in handles:
            h.remove()


# Operators by kind, for the profile's split of a training step (self time, CPU).
OP_KINDS = {
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::thnn_conv2d",
                    "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::_nnpack_spatial_convolution"),
    "matrix products": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm",
                        "aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "dropout random numbers": ("aten::bernoulli_", "aten::uniform_", "smca_d2::drop_mask"),
}


def op_kind_times(impl: "_Impl") -> dict:
    """Self CPU time of one training step by kind of operator (torch.profiler): the kinds that
    both implementations compute with the same libraries' kernels (convolutions, matrix products,
    dropout's random numbers) and everything else."""
    from torch.profiler import ProfilerActivity, profile

    kind_of = {op: kind for kind, ops in OP_KINDS.items() for op in ops}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        impl.train_step()
    totals = {kind: 0.0 for kind in list(OP_KINDS) + ["everything else"]}
    for event in prof.key_averages():
        totals[kind_of.get(event.key, "everything else")] += event.self_cpu_time_total / 1e6
    return totals


def tensor_peak_mib(fn) -> float:
    """The most memory that tensors allocated by one call of ``fn`` occupy at once (MiB, CPU): the
    allocations and frees torch.profiler records, summed in order. Unlike the peak RSS it does not
    depend on how ``malloc`` lays out, reuses and returns memory, nor on which thread's arena
    serves an allocation; tensors that exist before the call (weights, inputs) do not count."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _timed_runs(fn, warmup, repeats, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run_worker(spec) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import smca_d2  # noqa: F401  (compatibility fixes)

    device = spec["device"]
    impl = _Impl(spec)
    result = {"params": sum(p.numel() for p in impl.model.parameters() if p.requires_grad)}
    task, size = spec["task"], tuple(spec["size"])

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    if spec.get("keep_freed_memory") and device == "cpu":
        from smca_d2.engine import keep_freed_cpu_memory

        result["keep_freed_memory"] = keep_freed_cpu_memory()
    rss_before = _rss_kib("VmRSS")
    peak_reset = _reset_peak_rss()

    if task == "inference":
        images = _images(1, size)
        impl.model.eval()
        times = _timed_runs(lambda: impl.infer(images), spec["warmup"], spec["repeats"], device)
        result["s_per_image"] = statistics.median(times)
        result["times"] = times
    elif task == "outputs":
        images = _images(spec.get("batch", 1), size)
        impl.model.eval()
        torch.save(impl.raw_outputs(images), spec["save"])
    elif task == "train":
        images = _images(spec["batch"], size)
        boxes, labels = _targets(spec["batch"], size)
        impl.setup_training(images, boxes, labels)
        # The loss of the initial weights with dropout off (both models then compute the same
        # function), for the equality check; then timed steps with dropout on.
        transformer = impl.model.transformer
        transformer.eval()
        with torch.no_grad():
            result["initial_loss_no_dropout"] = float(impl.loss())
        transformer.train()
        times = _timed_runs(impl.train_step, spec["train_warmup"], spec["repeats"], device)
        result["s_per_iter"] = statistics.median(times)
        result["times"] = times
    elif task == "profile":
        images = _images(1, size)
        impl.model.eval()
        _timed_runs(lambda: impl.infer(images), spec["warmup"], 0, device)
        totals: Dict[str, float] = {}
        with _timing_hooks(impl, totals):
            times = _timed_runs(lambda: impl.infer(images), 0, spec["repeats"], device)
        n = spec["repeats"]
        result["inference_total_s"] = sum(times) / n
        result["inference_parts_s"] = {k: v / n for k, v in totals.items()}
        # A training step, split into forward parts (matcher included), the rest of the forward
        # and loss, and backward + optimizer step.
        boxes, labels = _targets(spec["batch"], size)
        train_images = _images(spec["batch"], size)
        impl.setup_training(train_images, boxes, labels)
        for _ in range(spec["warmup"]):
            impl.train_step()
        totals, fwd, bwd = {}, [], []
        for _ in range(n):
            with _timing_hooks(impl, totals):
                _sync(device)
                t0 = time.perf_counter()
                loss = impl.loss()
                _sync(device)
                t1 = time.perf_counter()
            impl.step(loss)
            _sync(device)
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
        result["train_parts_s"] = {k: v / n for k, v in totals.items()}
        result["train_forward_and_loss_s"] = sum(fwd) / n
        result["train_backward_and_step_s"] = sum(bwd) / n
        if device == "cpu":
            result["train_op_kinds_s"] = op_kind_times(impl)
    else:
        raise ValueError(f"unknown task {task!r}")

    if device.startswith("cuda"):
        result["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        result["peak_mem_kind"] = "cuda max_memory_allocated above the model"
    elif peak_reset and rss_before is not None:
        result["peak_mem_mib"] = (_rss_kib("VmHWM") - rss_before) / 1024
        result["peak_mem_kind"] = "peak RSS above the RSS after building the model"
    if device == "cpu" and task in ("inference", "train"):
        # One more call, profiled (after the RSS was read: the profiler's own memory is not in it).
        result["tensor_peak_mib"] = tensor_peak_mib(
            (lambda: impl.infer(images)) if task == "inference" else impl.train_step)
    return result


# =========================================================================== driver
def parse_size(text: str):
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 800x1066), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--official-repo", default=None, help="work tree of gaopengcuhk/SMCA-DETR (optional)")
    add("--device", default="cpu")
    add("--amp", action="store_true", help="also measure mixed precision (CUDA only)")
    add("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    add("--sizes", type=parse_size, nargs="+", default=[(800, 1066), (800, 1333)], metavar="HxW")
    add("--train-size", type=parse_size, default=(800, 1066), metavar="HxW")
    add("--train-batch", type=int, default=2)
    add("--warmup", type=int, default=1)
    add("--train-warmup", type=int, default=4,
        help="untimed training iterations first (until malloc's heap has grown to a step's peak; "
             "with glibc defaults the official code needs about 4)")
    add("--repeats", type=int, default=3)
    add("--inference-rounds", type=int, default=3,
        help="fresh processes per single-scale inference variant, run in turn like --train-rounds "
             "(default: %(default)s)")
    add("--train-rounds", type=int, default=3,
        help="fresh processes per training variant, run in turn (ours, official, ...) and reported "
             "as the median of the rounds' times (default: %(default)s)")
    add("--scaling-sizes", type=parse_size, nargs="*",
        default=[(480, 640), (640, 853), (800, 1066), (1024, 1365)], metavar="HxW")
    add("--scaling-queries", type=int, nargs="*", default=[100, 300, 900])
    add("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    add("--skip", nargs="*", default=[], choices=["profile", "scaling", "train"])
    add("--tol", type=float, default=1e-4, help="max |difference| of outputs (default: %(default)s)")
    add("--seed", type=int, default=0)
    add("--output", default="output/benchmarks/speed.json")
    add("--replot", default=None, metavar="JSON",
        help="only print the tables and write the plot of an earlier run's JSON")
    add("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.amp and not args.device.startswith("cuda"):
        parser.error("--amp needs --device cuda")
    if args.device.startswith("cuda"):
        import torch

        if not args.worker and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device on this machine")
    elif args.device != "cpu":
        parser.error(f"--device {args.device!r}: expected cpu or cuda[:N]")
    if args.official_repo and not os.path.isfile(os.path.join(args.official_repo, "models", "detr.py")):
        parser.error(f"--official-repo {args.official_repo!r} is not a work tree of SMCA-DETR (no models/detr.py)")
    return args


class Driver:
    def __init__(self, args, tmp):
        self.args, self.tmp, self.n = args, tmp, 0

    def run(self, **spec) -> dict:
        """Run one task in a fresh process; returns its result dict."""
        a = self.args
        spec = {"device": a.device, "threads": a.threads, "warmup": a.warmup, "repeats": a.repeats,
                "train_warmup": a.train_warmup,
                "seed": a.seed, "official_repo": a.official_repo, "batch": a.train_batch,
                # ours as train_net.py / demo.py run it; the official code as its main.py does
                "keep_freed_memory": spec["impl"] == "ours", **spec}
        self.n += 1
        spec_file = os.path.join(self.tmp, f"spec{self.n}.json")
        out_file = os.path.join(self.tmp, f"result{self.n}.json")
        with open(spec_file, "w") as f:
            json.dump({**spec, "result_file": out_file}, f)
        desc = f"{spec['impl']:8s} {spec.get('model', 'smca_single_scale'):17s} {spec['task']:9s} " \
               f"{spec['size'][0]}x{spec['size'][1]}" + (f" q{spec['num_queries']}" if spec.get("num_queries") else "") \
               + (" amp" if spec.get("amp") else "") + (" optimized" if spec.get("optimize") else "") \
               + (" channels-last" if spec.get("channels_last") else "") \
               + (" torch-dropout" if spec.get("torch_dropout") else "") \
               + (" keep-freed" if spec.get("keep_freed_memory") else "")
        print(f"  {desc} ...", end="", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_file],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(" FAILED")
            raise SystemExit(f"worker failed ({desc}):\n{proc.stderr[-4000:]}")
        with open(out_file) as f:
            result = json.load(f)
        print(f" {time.perf_counter() - t0:.0f} s", flush=True)
        return result


def _time_key(result: dict) -> str:
    return "s_per_iter" if "s_per_iter" in result else "s_per_image"


def median_of_rounds(results: List[dict]) -> dict:
    """One variant measured in several rounds (processes): the first round's result with the
    median time (``s_per_iter`` or ``s_per_image``) and the median peak memory of all rounds,
    and each round's (``rounds_<key>``). The peak RSS of one process varies by tens of MiB with
    where ``malloc`` happens to place blocks (one arena per thread)."""
    merged = dict(results[0])
    for key in (_time_key(merged), "peak_mem_mib"):
        values = [r[key] for r in results if key in r]
        if values:
            merged[key] = statistics.median(values)
            merged[f"rounds_{key}"] = values
    return merged


def run_rounds(drv: "Driver", variants: Dict[str, dict], rounds: int, **spec) -> Dict[str, dict]:
    """Each variant (name -> spec) run ``rounds`` times, in interleaved rounds (v1, v2, ..., v1,
    v2, ...: a slow spell of the machine hits all variants), merged by :func:`median_of_rounds`."""
    results: Dict[str, List[dict]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            results[name].append(drv.run(**spec, **variant))
    return {name: median_of_rounds(r) for name, r in results.items()}


def max_abs_diff(a_file: str, b_file: str) -> dict:
    import torch

    a, b = torch.load(a_file), torch.load(b_file)
    return {
        "max_abs_logits": max(float((x[0] - y[0]).abs().max()) for x, y in zip(a, b)),
        "max_abs_boxes": max(float((x[1] - y[1]).abs().max()) for x, y in zip(a, b)),
        "layers": len(a),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        with open(args.worker) as f:
            spec = json.load(f)
        result = run_worker(spec)
        with open(spec["result_file"], "w") as f:
            json.dump(result, f)
        return result
    if args.replot:
        with open(args.replot) as f:
            report = json.load(f)
        print_report(report)
        png = os.path.splitext(args.replot)[0] + ".png"
        plot_report(report, png)
        print(f"\nwrote {png}")
        return report

    import torch

    from smca_d2.benchmarking import environment, write_json

    report: dict = {
        "environment": environment(args.device, args.threads),
        # (the official checkout's folder and the output's file name only: no machine paths in
        # results people share)
        "settings": {k: (os.path.basename(os.path.normpath(v)) if k in ("official_repo", "output") and v else v)
                     for k, v in vars(args).items() if k not in ("worker", "replot")},
        "official": bool(args.official_repo),
    }
    impls = ["ours"] + (["official"] if args.official_repo else [])
    precisions = [False] + ([True] if args.amp else [])
    same_malloc = bool(args.official_repo) and args.device == "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        drv = Driver(args, tmp)
        common = {"model": "smca_single_scale"}
        if args.official_repo:
            # Shared random weights: the official model, seeded and perturbed, saved as the
            # official main.py saves; ours is built from it by the converter.
            from smca_d2.checkpoint.official_code import build_official_model

            import smca_d2  # noqa: F401

            model, official_ns, _ = build_official_model(args.official_repo, "cpu", args.seed)
            ckpt = os.path.join(tmp, "official.pth")
            torch.save({"model": model.state_dict(), "args": official_ns, "epoch": 0}, ckpt)
            del model
            common["official_checkpoint"] = ckpt

        print("single-scale R50: ours" + (" vs official" if args.official_repo else ""))
        single = report["single_scale"] = {"inference": [], "train": [], "equal_outputs": {}}
        # Outputs of every decoder layer: ours optimized for inference vs ours, and vs official.
        for batch in (1, 2):
            files = {}
            for impl, extra in [("ours", {}), ("ours", {"optimize": True})] + (
                [("official", {})] if args.official_repo else []
            ):
                name = impl + ("_optimized" if extra else "")
                files[name] = os.path.join(tmp, f"out_{name}_{batch}.pt")
                drv.run(impl=impl, task="outputs", size=args.sizes[0], batch=batch, save=files[name], **extra, **common)
            pairs = [("ours_optimized", "ours")] + ([("ours", "official"), ("ours_optimized", "official")]
                                                    if args.official_repo else [])
            for a, b in pairs:
                d = max_abs_diff(files[a], files[b])
                d["pass"] = d["max_abs_logits"] <= args.tol and d["max_abs_boxes"] <= args.tol
                single["equal_outputs"][f"{a} vs {b}, batch {batch}, {args.sizes[0][0]}x{args.sizes[0][1]}"] = d
        for amp in precisions:
            for size in args.sizes:
                row = {"size": list(size), "amp": amp}
                variants = {impl: dict(impl=impl) for impl in impls}
                variants["ours_optimized"] = dict(impl="ours", optimize=True)
                if same_malloc:
                    variants["official_same_malloc"] = dict(impl="official", keep_freed_memory=True)
                if args.device == "cpu":  # and ours with glibc's defaults, as the official code runs
                    variants["ours_default_malloc"] = dict(impl="ours", keep_freed_memory=False)
                row.update(run_rounds(drv, variants, args.inference_rounds, task="inference", size=size,
                                      amp=amp, **common))
                single["inference"].append(row)
            if "train" not in args.skip:
                row = {"size": list(args.train_size), "batch": args.train_batch, "amp": amp}
                variants = {impl: dict(impl=impl) for impl in impls}
                variants["ours_channels_last"] = dict(impl="ours", channels_last=True)
                if args.device == "cpu":  # ours with torch's dropout masks (model.fast_cpu_dropout=False)
                    variants["ours_torch_dropout"] = dict(impl="ours", torch_dropout=True)
                if same_malloc:
                    variants["official_same_malloc"] = dict(impl="official", keep_freed_memory=True)
                row.update(run_rounds(drv, variants, args.train_rounds, task="train", size=args.train_size,
                                      amp=amp, **common))
                if args.official_repo:
                    a, b = row["ours"]["initial_loss_no_dropout"], row["official"]["initial_loss_no_dropout"]
                    row["loss_rel_diff"] = abs(a - b) / max(abs(b), 1e-12)
                    row["loss_equal"] = row["loss_rel_diff"] <= args.tol
                single["train"].append(row)

        if "profile" not in args.skip:
            print("where the time goes (single-scale R50)")
            report["profile"] = {
                impl: drv.run(impl=impl, task="profile", size=args.train_size, **common) for impl in impls
            }

        others = [m for m in args.models if m != "smca_single_scale"]
        if others:
            print("other models (ours)")
        report["other_models"] = []
        for model in others:
            for amp in precisions:
                row = {"model": model, "amp": amp, "inference": {}, "train": None}
                for size in args.sizes:
                    row["inference"][f"{size[0]}x{size[1]}"] = drv.run(
                        impl="ours", model=model, task="inference", size=size, amp=amp)
                if "train" not in args.skip:
                    row["train"] = drv.run(impl="ours", model=model, task="train", size=args.train_size, amp=amp)
                report["other_models"].append(row)

        if "scaling" not in args.skip:
            print("scaling with image size and queries (single-scale, inference)")
            report["scaling"] = {"sizes": [], "queries": []}
            for size in args.scaling_sizes:
                report["scaling"]["sizes"].append({"size": list(size), **{
                    impl: drv.run(impl=impl, task="inference", size=size, model="smca_single_scale")["s_per_image"]
                    for impl in impls}})
            for q in args.scaling_queries:
                report["scaling"]["queries"].append({"num_queries": q, **{
                    impl: drv.run(impl=impl, task="inference", size=args.sizes[0], num_queries=q,
                                  model="smca_single_scale")["s_per_image"]
                    for impl in impls}})

    print_report(report)
    write_json(args.output, report)
    png = os.path.splitext(args.output)[0] + ".png"
    plot_report(report, png)
    print(f"\nwrote {args.output} and {png}")
    return report


def speedup_limit(r: dict) -> Optional[dict]:
    """The largest training speed-up over the official code that ours could reach by making
    everything else free: the official step time over ours' time in convolutions, matrix
    products and drawing dropout masks."""
    kinds = (r.get("profile") or {}).get("ours", {}).get("train_op_kinds_s")
    trains = r["single_scale"]["train"]
    if not kinds or not trains or "official" not in trains[0]:
        return None
    shared = sum(v for k, v in kinds.items() if k != "everything else")
    official = min(trains[0][k]["s_per_iter"] for k in ("official", "official_same_malloc") if k in trains[0])
    return {"shared_s": shared, "official_s_per_iter": official, "limit": official / shared}


def _ratio(ours, official):
    return f"{official / ours:.2f}x" if ours and official else "-"


def round_speedups(ours: dict, official: dict) -> Optional[List[float]]:
    """Official time over ours in each interleaved round (the rounds pair measurements taken
    minutes apart); None without rounds."""
    key = f"rounds_{_time_key(ours)}"
    a, b = ours.get(key), official.get(key)
    if not a or not b or len(a) != len(b):
        return None
    return [o / x for x, o in zip(a, b)]


def print_rounds(row: dict, ours_variants: List[str]) -> None:
    """The official / ours time ratio of each round, where a row was measured in rounds."""
    for variant in ours_variants:
        for against in ("official",) if variant == "ours_default_malloc" else ("official", "official_same_malloc"):
            ratios = round_speedups(row[variant], row[against]) if variant in row and against in row else None
            if ratios and len(ratios) > 1:
                print(f"  {against} / {variant}, round by round: " + ", ".join(f"{x:.2f}x" for x in ratios))


def print_report(r: dict) -> None:
    env = r["environment"]
    print(f"\n{env['date']}  {env['device']} ({env['processor']}, {env['cpu_count']} CPUs, "
          f"{env['threads']} threads), torch {env['torch']}")
    s = r["single_scale"]
    for name, d in s["equal_outputs"].items():
        print(f"outputs {name} (all decoder layers): max |diff| logits {d['max_abs_logits']:.2e}, "
              f"boxes {d['max_abs_boxes']:.2e} -> {'EQUAL' if d['pass'] else 'DIFFERENT'}")
    off = r["official"]
    print("\nsingle-scale R50")
    gpu = r["environment"]["device"] != "cpu"
    peak = "peak memory" if gpu else "peak RSS"
    mems = ("peak_mem_mib",) + (() if gpu else ("tensor_peak_mib",))  # the memory columns
    print("| task | size | precision | ours | " + ("official | speed-up | " if off else "")
          + f"{peak} ours (MiB) | " + (f"{peak} official (MiB) | " if off else "")
          + ("" if gpu else "peak tensors ours (MiB) | " + ("peak tensors official (MiB) |" if off else "")))
    print("|---|---|---|---|" + ("---|---|" if off else "") + ("---|---|" if off else "---|") * (1 if gpu else 2))

    def line(task, size, amp, o, f, key, unit):
        cells = [task, f"{size[0]}x{size[1]}", "AMP" if amp else "fp32", f"{o[key]:.3f} {unit}"]
        if f:
            cells += [f"{f[key]:.3f} {unit}", _ratio(o[key], f[key])]
        for mem in mems:
            cells.append(f"{o.get(mem, float('nan')):.0f}")
            if f:
                cells.append(f"{f.get(mem, float('nan')):.0f}")
        print("| " + " | ".join(cells) + " |")

    for row in s["inference"]:
        line("inference", row["size"], row["amp"], row["ours"], row.get("official"), "s_per_image", "s/img")
        line("inference, optimized", row["size"], row["amp"], row["ours_optimized"], row.get("official"),
             "s_per_image", "s/img")
        if "official_same_malloc" in row:
            line("inference vs official with the same malloc setting", row["size"], row["amp"], row["ours"],
                 row["official_same_malloc"], "s_per_image", "s/img")
            line("inference, optimized vs official with the same malloc setting", row["size"], row["amp"],
                 row["ours_optimized"], row["official_same_malloc"], "s_per_image", "s/img")
        if "ours_default_malloc" in row:
            line("inference, both with glibc's default malloc", row["size"], row["amp"], row["ours_default_malloc"],
                 row.get("official"), "s_per_image", "s/img")
        print_rounds(row, ["ours", "ours_optimized", "ours_default_malloc"])
    for row in s["train"]:
        line(f"train (batch {row['batch']})", row["size"], row["amp"], row["ours"], row.get("official"),
             "s_per_iter", "s/iter")
        if "ours_channels_last" in row:
            line(f"train (batch {row['batch']}), channels-last", row["size"], row["amp"],
                 row["ours_channels_last"], row.get("official"), "s_per_iter", "s/iter")
        if "ours_torch_dropout" in row:
            line(f"train (batch {row['batch']}), torch's dropout masks", row["size"], row["amp"],
                 row["ours_torch_dropout"], row.get("official"), "s_per_iter", "s/iter")
        if "official_same_malloc" in row:
            line(f"train (batch {row['batch']}) vs official with the same malloc setting", row["size"],
                 row["amp"], row["ours"], row["official_same_malloc"], "s_per_iter", "s/iter")
            if "ours_channels_last" in row:
                line(f"train (batch {row['batch']}), channels-last vs official with the same malloc setting",
                     row["size"], row["amp"], row["ours_channels_last"], row["official_same_malloc"],
                     "s_per_iter", "s/iter")
        print_rounds(row, ["ours", "ours_channels_last"])
        if "loss_equal" in row:
            print(f"  initial loss ours {row['ours']['initial_loss_no_dropout']:.6f} vs official "
                  f"{row['official']['initial_loss_no_dropout']:.6f} (rel. diff {row['loss_rel_diff']:.1e})"
                  f" -> {'EQUAL' if row['loss_equal'] else 'DIFFERENT'}")

    if r.get("profile"):
        print("\nwhere the time goes (seconds; inference: one image; train: one iteration)")
        parts = ["backbone", "encoder", "decoder", "gaussian_prior", "matcher"]
        print("| impl | inference total | " + " | ".join(parts) + " | backbone share | train fwd+loss | "
              "train bwd+step | train backbone fwd | train matcher |")
        print("|---" * (len(parts) + 7) + "|")
        for impl, p in r["profile"].items():
            ip, tp = p["inference_parts_s"], p["train_parts_s"]
            share = ip.get("backbone", 0) / p["inference_total_s"]
            cells = [impl, f"{p['inference_total_s']:.3f}"] + [
                f"{ip[k]:.3f}" if k in ip else "n/a" for k in parts
            ] + [f"{share:.0%}", f"{p['train_forward_and_loss_s']:.3f}", f"{p['train_backward_and_step_s']:.3f}",
                 f"{tp.get('backbone', 0):.3f}", f"{tp.get('matcher', 0):.3f}"]
            print("| " + " | ".join(cells) + " |")
        kinds = {impl: p["train_op_kinds_s"] for impl, p in r["profile"].items() if "train_op_kinds_s" in p}
        if kinds:
            names = list(next(iter(kinds.values())))
            print("\none training step by kind of operator (self CPU seconds, torch.profiler)")
            print("| impl | " + " | ".join(names) + " | total |")
            print("|---" * (len(names) + 2) + "|")
            for impl, k in kinds.items():
                print(f"| {impl} | " + " | ".join(f"{k[n]:.3f}" for n in names) + f" | {sum(k.values()):.3f} |")
            limit = speedup_limit(r)
            if limit:
                print(f"ours spends {limit['shared_s']:.2f} s in convolutions and matrix products (oneDNN's and "
                      f"MKL's kernels, like the official code's) and drawing dropout masks: unless these get "
                      f"faster, ours could train at most {limit['limit']:.2f}x faster than the official "
                      f"{limit['official_s_per_iter']:.2f} s/iter.")

    if r.get("other_models"):
        print("\nother models (ours)")
        print("| model | precision | " + " | ".join(f"inference {k} (s/img)" for k in r["other_models"][0]["inference"])
              + f" | train (s/iter) | {peak} train (MiB) |" + ("" if gpu else " peak tensors train (MiB) |"))
        print("|---" * (len(r["other_models"][0]["inference"]) + 4 + (not gpu)) + "|")
        for row in r["other_models"]:
            t = row["train"]
            print(f"| {row['model']} | {'AMP' if row['amp'] else 'fp32'} | "
                  + " | ".join(f"{v['s_per_image']:.3f}" for v in row["inference"].values())
                  + (f" | {t['s_per_iter']:.3f} | " + " | ".join(f"{t.get(m, float('nan')):.0f}" for m in mems) + " |"
                     if t else " | -" * (1 + len(mems)) + " |"))

    if r.get("scaling"):
        print("\ninference time (s/img) vs image size and number of queries (single-scale)")
        impls = ["ours"] + (["official"] if off else [])
        print("| image size | " + " | ".join(impls) + (" | speed-up |" if off else " |"))
        print("|---" * (len(impls) + 1 + bool(off)) + "|")
        for row in r["scaling"]["sizes"]:
            print(f"| {row['size'][0]}x{row['size'][1]} | " + " | ".join(f"{row[i]:.3f}" for i in impls)
                  + (f" | {_ratio(row['ours'], row['official'])} |" if off else " |"))
        print("| queries | " + " | ".join(impls) + (" | speed-up |" if off else " |"))
        print("|---" * (len(impls) + 1 + bool(off)) + "|")
        for row in r["scaling"]["queries"]:
            print(f"| {row['num_queries']} | " + " | ".join(f"{row[i]:.3f}" for i in impls)
                  + (f" | {_ratio(row['ours'], row['official'])} |" if off else " |"))


_BAR_LEGEND = {"ours_optimized": "ours optimized (inference) / channels-last (train)",
               "official_same_malloc": "official, same malloc setting as ours"}


def _bars(ax, s: dict, names: List[str], field, ylabel: str, title: str, fmt: str) -> None:
    """Grouped bars, one group per single-scale task (inference sizes, training), one bar per
    variant in ``names`` ("ours_optimized" stands for channels-last in training); ``field(row
    entry, task)`` gives a bar's height (None: no bar)."""
    labels, values = [], {i: [] for i in names}
    for task, rows in (("inference", s["inference"]), ("train", s["train"])):
        for row in rows:
            labels.append((f"infer {row['size'][0]}x{row['size'][1]}" if task == "inference" else f"train b{row['batch']}")
                          + (" AMP" if row["amp"] else ""))
            for i in names:
                key = "ours_channels_last" if task == "train" and i == "ours_optimized" else i
                values[i].append((field(row[key], task) if key in row else None) or 0)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [x + (k - (len(names) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, values[name], width, label=_BAR_LEGEND.get(name, name))
        ax.bar_label(bars, labels=[fmt.format(v) if v else "" for v in values[name]], fontsize=6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    tallest = max((v for vals in values.values() for v in vals), default=0) or 1.0
    ax.set_ylim(0, tallest * 1.7)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left")


def plot_report(r: dict, path: str) -> None:
    """PNG: single-scale times and peak memory, ours vs official; inference time vs image size and
    vs queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = ["ours"] + (["official"] if r["official"] else [])
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    s = r["single_scale"]
    names = impls[:1] + ["ours_optimized"] + impls[1:]
    if any("official_same_malloc" in row for row in s["inference"] + s["train"]):
        names.append("official_same_malloc")
    _bars(axes[0], s, names, lambda e, task: e["s_per_image" if task == "inference" else "s_per_iter"],
          "seconds", "single-scale R50: time", "{:.2f}")
    # Peak memory: the tensors' peak on the CPU (the same for both malloc settings), the allocator's
    # on a GPU.
    mem = "tensor_peak_mib" if r["environment"]["device"] == "cpu" else "peak_mem_mib"
    _bars(axes[1], s, [n for n in names if n != "official_same_malloc"], lambda e, task: e.get(mem), "MiB",
          "single-scale R50: peak " + ("tensor memory" if mem == "tensor_peak_mib" else "memory"), "{:.0f}")
    sc = r.get("scaling")
    if sc:
        by_size, by_queries = axes[2], axes[3]
        for i in impls:
            by_size.plot([row["size"][0] * row["size"][1] / 1e6 for row in sc["sizes"]],
                         [row[i] for row in sc["sizes"]], marker="o", label=i)
            by_queries.plot([row["num_queries"] for row in sc["queries"]], [row[i] for row in sc["queries"]],
                            marker="o", label=i)
        by_size.set_xlabel("image megapixels")
        by_size.set_title("inference vs image size")
        by_queries.set_xlabel("queries")
        by_queries.set_title("inference vs number of queries")
        for ax in (by_size, by_queries):
            ax.set_ylabel("s / image")
            ax.grid(alpha=0.3)
            ax.legend()
    env = r["environment"]
    fig.suptitle(f"{env['device']} ({env['cpu_count']} CPUs, {env['threads']} threads), torch {env['torch']}, {env['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
