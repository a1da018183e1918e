#!/usr/bin/env python
"""One measurement of the speed benchmark, in its own process (so that peak memory belongs to one
model and one task):

    python benchmarks/speed_worker.py SPEC.json

``benchmarks/speed.py`` writes the spec (a JSON dict: the task, the implementation and its
settings, see ``speed_models.py``) and reads the result from the spec's ``result_file``. Tasks:
``inference`` (time per image), ``train`` (time per iteration and the initial loss),
``max_batch`` (the largest training batch that fits, and its time per iteration), ``outputs``
(every decoder layer's raw outputs, saved for the equality check) and ``profile`` (where the time
goes). On the CPU the peak RSS above the level after the model is built and the peak of the
tensors one call allocates are recorded; on a GPU ``torch.cuda.max_memory_allocated``.

On CUDA the equality checks (``outputs``, and the initial loss of ``train``) compute in plain
float32, without TF32 (which cuDNN's convolutions use by default): both implementations then
agree to float32 rounding; the timed runs keep torch's defaults, as users run.
"""

import json
import re
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from speed_models import build_model, harness

__all__ = ["OP_KINDS", "largest_batch", "op_kind_times", "run_worker", "tensor_peak_mib", "timed_runs"]


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
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def exact_float32(device: str):
    """No TF32 in CUDA's convolutions and matrix products (a no-op on the CPU)."""
    if not device.startswith("cuda"):
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _images(count, size, seed=0):
    h, w = size
    return [harness().synthetic_image(h, w, seed + i) for i in range(count)]


def _targets(count, size, seed=0):
    """Seeded random boxes (pixels, XYXY) and official class ids (1..90, COCO ids in use)."""
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


def _decoder_layers(out) -> list:
    """Every decoder layer's (logits, boxes), last layer first, as float32 CPU tensors."""
    layers = [out] + list(reversed(out.get("aux_outputs", [])))
    return [(o["pred_logits"].float().cpu(), o["pred_boxes"].float().cpu()) for o in layers]


@contextmanager
def _timing_hooks(impl, totals: Dict[str, float]):
    """Accumulate wall time spent in each part (forward) into ``totals``."""
    handles, starts, patched = [], {}, []
    device = impl.device

    def timed_call(original, name):
        def call(*a, **k):
            _sync(device)
            t0 = time.perf_counter()
            out = original(*a, **k)
            _sync(device)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
            return out

        return call

    for name, module in impl.parts().items():
        if hasattr(module, "match_layers"):
            # smca_d2's SetCriterion matches all decoder layers with this, not with forward().
            module.match_layers = timed_call(module.match_layers, name)
            patched.append(module)

        def pre(_m, _inp, name=name):
            _sync(device)
            starts[name] = time.perf_counter()

        def post(_m, _inp, _out, name=name):
            _sync(device)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - starts.pop(name)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    def timing(original):
        return timed_call(original, "gaussian_prior")

    try:
        with impl.timing_gaussian_prior(timing):
            yield
    finally:
        for h in handles:
            h.remove()
        for module in patched:
            del module.match_layers  # the instance attribute: the class's method again


# Operators by kind, for the profile's split of a training step (self time, CPU).
OP_KINDS = {
    "convolution": (
        "aten::mkldnn_convolution",
        "aten::convolution_backward",
        "aten::thnn_conv2d",
        "aten::_slow_conv2d_forward",
        "aten::_slow_conv2d_backward",
        "aten::_nnpack_spatial_convolution",
    ),
    "matrix products": (
        "aten::mm",
        "aten::bmm",
        "aten::addmm",
        "aten::baddbmm",
        "aten::addbmm",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "dropout random numbers": ("aten::bernoulli_", "aten::uniform_", "smca_d2::drop_mask"),
}


def op_kind_times(impl) -> dict:
    """Self CPU time of one training step by kind of operator (torch.profiler): the kinds that
    both implementations compute with the same libraries' kernels (convolutions, matrix products,
    dropout's random numbers) and everything else."""
    from torch.profiler import ProfilerActivity, profile

    kind_of = {op: kind for kind, ops in OP_KINDS.items() for op in ops}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        impl.train_step()
    totals = dict.fromkeys(list(OP_KINDS) + ["everything else"], 0.0)
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
    events = sorted(
        (
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        ),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def timed_runs(fn, warmup, repeats, device):
    """Wall times of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
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


def _free_training_state(impl) -> None:
    """Drop the gradients, the optimizer and the batch of a training setup (after an
    out-of-memory error too), and return the cached blocks to the device."""
    for p in impl.model.parameters():
        p.grad = None
    impl.optimizer = None
    for name in ("inputs", "samples", "targets"):
        if hasattr(impl, name):
            setattr(impl, name, None)
    if impl.device.startswith("cuda"):
        torch.cuda.empty_cache()


def _try_batch(impl, batch: int, size) -> Optional[float]:
    """Peak memory (MiB, ``torch.cuda.max_memory_allocated``) of two training steps at ``batch``
    (the second with the optimizer's state allocated), or None when they run out of memory."""
    boxes, labels = _targets(batch, size)
    torch.cuda.reset_peak_memory_stats()
    try:
        impl.setup_training(_images(batch, size), boxes, labels)
        impl.train_step()
        impl.train_step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        _free_training_state(impl)


def largest_batch(try_batch, budget_mib: float, cap: int, max_tries: int = 6) -> tuple:
    """The largest batch that fits ``budget_mib``, from the peak memory of batches 2 and 4
    (memory grows linearly with the batch: weights, optimizer state and cached blocks, plus
    activations per image), tried and lowered by a tenth while it does not fit.

    Args:
        try_batch: ``batch -> peak MiB``, or None when the batch ran out of memory.
        budget_mib: the memory a batch may take.
        cap: the largest batch considered.
        max_tries: batches tried after 2 and 4.

    Returns:
        (batch or None, why it stopped there: "memory", "cap" or what failed, [[batch, peak or None], ...])
    """
    tried: List[list] = []

    def attempt(batch):
        peak = try_batch(batch)
        tried.append([batch, peak])
        return peak is not None and peak <= budget_mib

    if not attempt(2):
        return None, "batch 2 does not fit", tried
    if cap < 4 or not attempt(4):
        return 2, "memory" if cap >= 4 else "cap", tried
    per_image = max((tried[1][1] - tried[0][1]) / 2, 1e-6)
    batch = min(cap, max(4, 4 + int((budget_mib - tried[1][1]) / per_image)))
    limit = "cap" if batch == cap else "memory"
    for _ in range(max_tries):
        if batch <= 4:
            return 4, "memory", tried
        if attempt(batch):
            return batch, limit, tried
        batch, limit = max(4, int(batch * 0.9)), "memory"
    return None, f"no batch below the estimate fitted in {max_tries} tries", tried


def _max_batch(impl, spec, size, result) -> None:
    """The largest training batch of ``size`` images (``max_batch_cap`` at most) and its time per
    iteration. On CUDA it is searched for (:func:`largest_batch`) within ``max_batch_memory``
    (a fraction) of the device's memory; on the CPU the batch is ``max_batch_cap`` (no search: the
    benchmark's plumbing at a small size)."""
    device, cap = spec["device"], int(spec.get("max_batch_cap", 64))
    if device.startswith("cuda"):
        _free_training_state(impl)
        free, total = torch.cuda.mem_get_info()
        budget = (free + torch.cuda.memory_allocated()) * float(spec.get("max_batch_memory", 0.9)) / 2**20
        batch, limit, tried = largest_batch(lambda b: _try_batch(impl, b, size), budget, cap)
        result.update(memory_budget_mib=budget, device_memory_mib=total / 2**20, tried=tried)
    else:
        batch, limit = cap, "cap (CPU: no memory search)"
    result.update(batch=batch, limit=limit)
    if batch is None:
        return
    boxes, labels = _targets(batch, size)
    impl.setup_training(_images(batch, size), boxes, labels)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = timed_runs(impl.train_step, 1, min(spec["repeats"], 3), device)
    result["s_per_iter"] = statistics.median(times)
    result["images_per_s"] = batch / result["s_per_iter"]
    result["times"] = times


def _profile(impl, spec, size, result) -> None:
    """Inference split into the timed parts; a training step split into its forward parts
    (matcher included), the rest of the forward and loss, and backward + optimizer step."""
    device, n = spec["device"], spec["repeats"]
    images = _images(1, size)
    impl.model.eval()
    timed_runs(lambda: impl.infer(images), spec["warmup"], 0, device)
    totals: Dict[str, float] = {}
    with _timing_hooks(impl, totals):
        times = timed_runs(lambda: impl.infer(images), 0, n, device)
    result["inference_total_s"] = sum(times) / n
    result["inference_parts_s"] = {k: v / n for k, v in totals.items()}

    boxes, labels = _targets(spec["batch"], size)
    impl.setup_training(_images(spec["batch"], size), boxes, labels)
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


def run_worker(spec) -> dict:
    """Run the task of ``spec`` and return its result (a JSON-able dict)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import smca_d2  # noqa: F401  (compatibility fixes)
    from smca_d2.speedups.memory import keep_freed_cpu_memory, keeps_freed_cpu_memory

    device = spec["device"]
    impl = build_model(spec)
    result = {"params": sum(p.numel() for p in impl.model.parameters() if p.requires_grad)}
    task, size = spec["task"], tuple(spec["size"])

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    if device == "cpu":
        # Ours: as train.speedups.keep_freed_cpu_memory had it applied when the model was built;
        # the official code as its main.py runs, or with ours' setting ("official_same_malloc").
        if spec.get("keep_freed_memory"):
            keep_freed_cpu_memory()
        result["keep_freed_memory"] = keeps_freed_cpu_memory()
    rss_before = _rss_kib("VmRSS")
    peak_reset = _reset_peak_rss()

    if task == "inference":
        images = _images(1, size)
        impl.model.eval()
        times = timed_runs(lambda: impl.infer(images), spec["warmup"], spec["repeats"], device)
        result["s_per_image"] = statistics.median(times)
        result["times"] = times
    elif task == "outputs":
        impl.model.eval()
        with exact_float32(device):
            outputs = impl.raw_outputs(_images(spec.get("batch", 1), size))
        torch.save(_decoder_layers(outputs), spec["save"])
    elif task == "train":
        images = _images(spec["batch"], size)
        boxes, labels = _targets(spec["batch"], size)
        impl.setup_training(images, boxes, labels)
        # The loss of the initial weights with dropout off (both models then compute the same
        # function), for the equality check; then timed steps with dropout on.
        transformer = impl.model.transformer
        transformer.eval()
        with torch.no_grad(), exact_float32(device):
            result["initial_loss_no_dropout"] = float(impl.loss())
        transformer.train()
        times = timed_runs(impl.train_step, spec["train_warmup"], spec["repeats"], device)
        result["s_per_iter"] = statistics.median(times)
        result["times"] = times
    elif task == "max_batch":
        _max_batch(impl, spec, size, result)
    elif task == "profile":
        _profile(impl, spec, size, result)
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
            (lambda: impl.infer(images)) if task == "inference" else impl.train_step
        )
    return result


def main(spec_file: str) -> dict:
    with open(spec_file) as f:
        spec = json.load(f)
    result = run_worker(spec)
    with open(spec["result_file"], "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} SPEC.json (written by benchmarks/speed.py)")
    main(sys.argv[1])
