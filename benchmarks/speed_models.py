"""The two implementations the speed benchmark measures, behind one interface: ours (smca_d2, with
the speed-ups of :mod:`smca_d2.speedups` as a worker's spec asks) and the official code (a checkout
of gaopengcuhk/SMCA-DETR, run through ``tools/official_harness.py``).

A spec (a dict, see ``benchmarks/speed.py``) says which: ``impl`` ("ours" or "official"),
``model`` (a key of :data:`CONFIGS`), ``device``, ``seed``, ``num_queries``, ``amp``,
``official_checkpoint`` (shared weights) and, for ours, ``opts`` (config overrides),
``speedups`` and ``optimize``:

* ``speedups``: None for the model as built (no speed-up at all); otherwise a dict of
  ``train.speedups`` options that replace the config's, applied with
  :func:`smca_d2.speedups.apply_speedups` as train_net.py does (``{}``: the config's own);
* ``optimize``: apply them for inference instead (``training=False``: frozen batch norms folded
  into the convolutions, a channels-last backbone on the CPU), as LazyPredictor and
  ``train_net.py --eval-only`` do.
"""

import contextlib
import os

import torch
from common import REPO_ROOT, import_tool

__all__ = ["CONFIGS", "NUM_CLASS_COLUMNS", "OfficialModel", "OursModel", "build_model", "harness"]

CONFIGS = {
    "smca_single_scale": "configs/smca_single_scale_r50_50ep.py",
    "smca_multi_scale": "configs/smca_multi_scale_r50_50ep.py",
    "detr_baseline": "configs/detr_baseline_r50_50ep.py",
}
NUM_CLASS_COLUMNS = 92  # the official head: every COCO id + "no object"; ours converted with all


def harness():
    """tools/official_harness.py: the official code's runner, and the synthetic images."""
    return import_tool("official_harness")


class _Model:
    """Inference, raw outputs, a training step and the parts that the profile times."""

    def __init__(self, spec):
        self.spec, self.device = spec, spec["device"]
        self.scaler = None
        torch.manual_seed(spec.get("seed", 0))

    @contextlib.contextmanager
    def autocast(self):
        if self.spec.get("amp") and self.device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.float16):
                yield
        else:
            yield

    def train_step(self) -> float:
        return self.step(self.loss())

    def step(self, loss) -> float:
        """Backward, gradient clipping and the optimizer step for ``loss``; returns its value."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.clip_gradients(self.scaler)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.clip_gradients(None)
            self.optimizer.step()
        return float(loss.detach())

    def clip_gradients(self, scaler) -> None:
        """Clip before the step, where the optimizer does not (the official code)."""

    def timing_gaussian_prior(self, timing):
        """A context in which ``timing(fn)`` wraps the computation of the Gaussian prior."""
        return contextlib.nullcontext()

    def parts(self) -> dict:
        """Submodules timed by the profile: name -> module."""
        m = self.model
        return {
            "backbone": m.backbone,
            "encoder": m.transformer.encoder,
            "decoder": m.transformer.decoder,
            "matcher": self.matcher,
        }


class OursModel(_Model):
    """smca_d2's model of ``spec["model"]``, as train_net.py trains it and LazyPredictor runs it."""

    def __init__(self, spec):
        super().__init__(spec)
        from smca_d2.engine import load_config
        from smca_d2.speedups import apply_speedups

        from detectron2.config import instantiate

        cfg = load_config(os.path.join(REPO_ROOT, CONFIGS[spec["model"]]), list(spec.get("opts") or []))
        cfg.model.num_classes = NUM_CLASS_COLUMNS
        if spec.get("num_queries"):
            cfg.model.num_queries = spec["num_queries"]
        self.model = instantiate(cfg.model).to(self.device).eval()
        if spec.get("official_checkpoint"):
            from smca_d2.checkpoint import convert_official_state_dict, load_official_checkpoint

            sd = convert_official_state_dict(
                load_official_checkpoint(spec["official_checkpoint"]), num_classes=NUM_CLASS_COLUMNS
            )
            self.model.load_state_dict(sd, strict=True)
        # After the weights are loaded, as LazyPredictor does (folding changes the weights).
        if spec.get("speedups") is not None:
            options = {**cfg.train.speedups, **spec["speedups"]}
            apply_speedups(self.model, options, device=self.device, training=not spec.get("optimize"))
        self.cfg = cfg
        self.matcher = self.model.criterion.matcher

    def infer(self, images):
        inputs = [{"image": img.to(self.device), "height": img.shape[-2], "width": img.shape[-1]} for img in images]
        with torch.no_grad(), self.autocast():
            return self.model(inputs)  # the path users run: top-100, Instances in pixels

    def raw_outputs(self, images):
        inputs = [{"image": img.to(self.device)} for img in images]
        with torch.no_grad():
            return self.model.forward_outputs(self.model.preprocess_image(inputs))

    def setup_training(self, images, boxes, labels):
        from detectron2.config import instantiate
        from detectron2.structures import Boxes, Instances

        self.model.train()
        self.inputs = []
        for img, b, lab in zip(images, boxes, labels):
            inst = Instances(tuple(img.shape[-2:]))
            inst.gt_boxes = Boxes(b.clone())
            inst.gt_classes = lab.clone()
            self.inputs.append({"image": img, "instances": inst})
        self.cfg.optimizer.params.model = self.model
        self.optimizer = instantiate(self.cfg.optimizer)  # clips inside step(), after unscaling
        self.scaler = torch.amp.GradScaler("cuda") if self.spec.get("amp") else None

    def loss(self):
        """The total weighted loss of the current weights (graph kept)."""
        with self.autocast():
            return sum(self.model(self.inputs).values())

    def timing_gaussian_prior(self, timing):
        from smca_d2.inference.gaussian_maps import wrapped_gaussian_log_weights

        return wrapped_gaussian_log_weights(timing)


class OfficialModel(_Model):
    """The official single-scale model, trained as its main.py trains it."""

    def __init__(self, spec):
        super().__init__(spec)
        h = harness()
        overrides = {"num_queries": spec["num_queries"]} if spec.get("num_queries") else {}
        self.model, self.criterion, self.args, self.misc = h.build_official_model(
            spec["official_repo"],
            self.device,
            spec.get("seed", 0),
            randomize=False,
            with_criterion=True,
            **overrides,
        )
        if spec.get("official_checkpoint"):
            sd = torch.load(spec["official_checkpoint"], map_location="cpu", weights_only=False)["model"]
            self.model.load_state_dict(sd)
        self.postprocess = h.import_official(spec["official_repo"])[1].PostProcess()
        self.matcher = self.criterion.matcher

    def infer(self, images):
        with torch.no_grad(), self.autocast():
            out = harness().run_official(self.model, self.misc, images, self.device)
            sizes = torch.tensor([img.shape[-2:] for img in images], device=self.device)
            return self.postprocess(out, sizes)  # the official top-100 and boxes in pixels

    def raw_outputs(self, images):
        with torch.no_grad():
            return harness().run_official(self.model, self.misc, images, self.device)

    def setup_training(self, images, boxes, labels):
        h = harness()
        self.model.train()
        self.samples = h.official_samples(self.misc, images, self.device)
        self.targets = h.official_targets(images, boxes, labels, device=self.device)
        a = self.args
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if "backbone" not in n]},
            {"params": [p for n, p in named if "backbone" in n], "lr": a.lr_backbone},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=a.lr, weight_decay=a.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.spec.get("amp") else None

    def loss(self):
        with self.autocast():
            outputs = self.model([self.samples, self.targets])
            loss_dict = self.criterion(outputs, self.targets)
        w = self.criterion.weight_dict
        return sum(loss_dict[k] * w[k] for k in loss_dict if k in w)

    def clip_gradients(self, scaler) -> None:
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_max_norm)


def build_model(spec) -> _Model:
    """The implementation of ``spec["impl"]``."""
    if spec["impl"] == "official":
        return OfficialModel(spec)
    if spec["impl"] == "ours":
        return OursModel(spec)
    raise ValueError(f"unknown implementation {spec['impl']!r}")
