"""Differences between detectron2 versions, handled in one place.

smca_d2 runs on two kinds of detectron2 (both are tested: ``make test`` and
``DETECTRON2_SRC=<checkout> make test``):

* a full build (official ``main`` with the compiled ``detectron2._C``), as GPU users have;
* the pure-Python ``v0.6`` package without ``_C`` that ``make`` installs on machines where
  detectron2 cannot be compiled.

:func:`apply` is called when ``smca_d2`` is imported, before any detectron2 submodule. Every fix
here is a no-op where detectron2 (or its environment) already provides the thing.

Where ``main`` has a piece that ``v0.6`` lacks, the upstream piece is used when present:

=========================================  ===================================================
upstream (``main``)                        in smca_d2
=========================================  ===================================================
``engine.launch`` with GLOO on the CPU     its process entry is used by
                                           ``smca_d2.engine.launch``; an own GLOO entry on
                                           v0.6 (NCCL hard-coded, CUDA asserted there)
``create_ddp_model``                       :func:`create_ddp_model` delegates, adding
                                           ``device_ids=None`` for a CPU model (v0.6 passes
                                           the local rank, which DDP rejects on the CPU)
``DetectionCheckpointer``'s URL query      used (``SafeCheckpointer`` reads ``.pth`` files
``?matching_heuristics=True`` and its      through ``_torch_load``); parsed by
``_torch_load`` hook                       ``SafeCheckpointer`` on v0.6
``utils.analysis.FlopCountAnalysis``       :func:`flop_count_analysis` uses it; on v0.6 it
                                           cannot be imported (``detectron2.export`` imports
                                           caffe2): fvcore's on a wrapper module
``solver.get_default_optimizer_params``    not used: v0.6 has no ``lr_factor_func``;
with ``lr_factor_func``                    ``smca_d2.solver.param_groups`` gives the same lr and
                                           weight decay per tensor (tested against it on main)
``engine.AMPTrainer(precision=...)``       not used: it asserts CUDA and always scales the
                                           loss; ``smca_d2.engine.AMPTrainer`` also runs
                                           bfloat16 on the CPU, without a scaler for bfloat16
=========================================  ===================================================
"""

import functools
import importlib
import importlib.util
import inspect
import logging
import sys
import types
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["HAS_C", "apply", "create_ddp_model", "distributed_worker", "flop_count_analysis", "MissingExtensionError"]

logger = logging.getLogger(__name__)

_EXT_NAME = "detectron2._C"


class MissingExtensionError(AttributeError):
    """Raised when code reaches for an op of detectron2's compiled extension, which is absent."""


class _MissingExtension(types.ModuleType):
    """Stands in for ``detectron2._C`` so that modules importing it (deformable conv, rotated boxes)
    still import. SMCA uses none of these ops; calling one fails with a clear message."""

    def __init__(self):
        super().__init__(_EXT_NAME)
        self.__file__ = None

    @staticmethod
    def get_compiler_version():  # read by detectron2.utils.collect_env
        return "n/a (detectron2 installed without its C++ extension)"

    @staticmethod
    def get_cuda_version():
        return "n/a"

    @staticmethod
    def has_cuda():
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingExtensionError(
            f"detectron2._C.{name} is not available: this detectron2 was installed without its "
            "compiled C++/CUDA extension. smca_d2 does not need it, but the op you called does "
            "(deformable convolution, rotated boxes, ...). Install a full detectron2 build to use it."
        )


def _has_compiled_extension() -> bool:
    module = sys.modules.get(_EXT_NAME)
    if module is not None:
        return not isinstance(module, _MissingExtension)
    return importlib.util.find_spec(_EXT_NAME) is not None


def _patch_pkg_resources():
    # detectron2.model_zoo does `import pkg_resources` (removed from setuptools >= 81).
    if importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")

        def resource_filename(package, resource):
            spec = importlib.util.find_spec(package)
            base = spec.submodule_search_locations[0]
            return f"{base}/{resource}"

        shim.resource_filename = resource_filename
        sys.modules["pkg_resources"] = shim


def _patch_pillow():
    # Pillow >= 10 removed Image.LINEAR; detectron2 v0.6 uses it as a default argument.
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _import_jit_scripted_modules():
    # torch >= 2.14 warns that torch.jit.script is deprecated each time it is called, and fvcore
    # and detectron2 call it at import time (fvcore.nn.focal_loss,
    # detectron2.modeling.box_regression): every program would print the warning twice, about
    # code that is not its own. Those modules are imported here without it; torch.jit.script
    # called anywhere else still warns.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        importlib.import_module("fvcore.nn")
        importlib.import_module("detectron2.modeling.box_regression")


def _patch_coco_evaluator():
    # COCOEvaluator(use_fast_impl=True), its default, needs _C: fall back to pycocotools.
    from pycocotools.cocoeval import COCOeval

    from detectron2.evaluation import coco_evaluation

    coco_evaluation.COCOeval_opt = COCOeval


HAS_C = False
_applied = False


def apply():
    """Make the installed detectron2 usable by smca_d2. Idempotent."""
    global HAS_C, _applied
    if _applied:
        return
    _patch_pkg_resources()
    _patch_pillow()
    HAS_C = _has_compiled_extension()
    if not HAS_C:
        sys.modules[_EXT_NAME] = _MissingExtension()
        import detectron2

        detectron2._C = sys.modules[_EXT_NAME]
    _import_jit_scripted_modules()
    if not HAS_C:
        _patch_coco_evaluator()
    _applied = True


# ---------------------------------------------------------------------------------------------
# Multi-process launch
# ---------------------------------------------------------------------------------------------
DEFAULT_TIMEOUT = timedelta(minutes=30)


@functools.cache
def _detectron2_launch_supports_cpu() -> bool:
    launch_module = importlib.import_module("detectron2.engine.launch")
    return "GLOO" in inspect.getsource(launch_module)


def distributed_worker():
    """The entry of each process of a multi-process job (``local_rank, main_func, world_size,
    num_gpus_per_machine, machine_rank, dist_url, args, timeout``), which sets up the process
    group, the local group and the device and then calls ``main_func(*args)``: detectron2's, or
    on v0.6 without CUDA :func:`_cpu_worker`, the same with GLOO."""
    if torch.cuda.is_available() or _detectron2_launch_supports_cpu():
        return _detectron2_worker
    return _cpu_worker


def _detectron2_worker(*args):
    apply()  # a spawned process starts fresh
    from detectron2.engine.launch import _distributed_worker

    _distributed_worker(*args)


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    from detectron2.utils import comm

    apply()  # a spawned process starts fresh
    global_rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="GLOO",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception as e:
        logger.error("Process group URL: %s", dist_url)
        raise e
    if hasattr(comm, "create_local_process_group"):  # detectron2 main
        comm.create_local_process_group(num_per_machine)
    else:  # detectron2 v0.6
        assert comm._LOCAL_PROCESS_GROUP is None
        for i in range(world_size // num_per_machine):
            ranks = list(range(i * num_per_machine, (i + 1) * num_per_machine))
            group = dist.new_group(ranks)
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        # Without an explicit teardown, GLOO's threads can be torn down at interpreter exit while
        # still running, which aborts the process ("terminate called without an active exception").
        dist.destroy_process_group()


def create_ddp_model(model, *, fp16_compression=False, **kwargs):
    """:func:`detectron2.engine.create_ddp_model` that also accepts a model on the CPU
    (``DistributedDataParallel`` needs ``device_ids=None`` there; detectron2 v0.6 passes the
    local rank)."""
    from detectron2.engine import create_ddp_model as d2_create_ddp_model

    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_create_ddp_model(model, fp16_compression=fp16_compression, **kwargs)


# ---------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------
class _DetectionsAsTensors(torch.nn.Module):
    """Calls a detectron2 model on one image and returns its detections as a tuple of tensors
    (what fvcore can trace)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        instances = self.model([{"image": image}])[0]["instances"]
        return tuple(v.tensor if hasattr(v, "tensor") else v for v in instances.get_fields().values())


def flop_count_analysis(model: torch.nn.Module, image: torch.Tensor):
    """An fvcore ``FlopCountAnalysis`` of ``model`` on one CHW image: detectron2's
    ``FlopCountAnalysis`` (it traces detectron2 models through ``TracingAdapter``) where it can
    be imported, else fvcore's on a wrapper that returns the detections as tensors. Module names
    start with ``model.`` either way."""
    try:
        from detectron2.utils.analysis import FlopCountAnalysis
    except ImportError:  # v0.6: detectron2.export imports caffe2
        from fvcore.nn import FlopCountAnalysis as _Fvcore

        return _Fvcore(_DetectionsAsTensors(model), (image,))
    return FlopCountAnalysis(model, [{"image": image}])
