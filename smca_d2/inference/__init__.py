"""Inference: a one-image predictor for LazyConfig models, demo helpers, SMCA's Gaussian maps and
export.

``gaussian_maps`` (needs matplotlib to draw) and ``export`` are imported on demand::

    from smca_d2.inference import LazyPredictor
    from smca_d2.inference.gaussian_maps import compute_smca_maps, save_smca_maps
    from smca_d2.inference.export import export_program
"""

from .demo import collect_inputs, draw_instances, filter_instances, instances_to_json, run_on_image, run_on_video
from .predictor import (
    LazyPredictor,
    build_test_augmentations,
    dataset_class_names,
    load_inference_weights,
    untrained_keys,
    warn_if_untrained,
)

__all__ = [
    "LazyPredictor",
    "build_test_augmentations",
    "collect_inputs",
    "dataset_class_names",
    "draw_instances",
    "filter_instances",
    "instances_to_json",
    "load_inference_weights",
    "run_on_image",
    "run_on_video",
    "untrained_keys",
    "warn_if_untrained",
]
