"""smca-d2's configs by name, as in ``detectron2.model_zoo``::

    from smca_d2 import model_zoo

    cfg = model_zoo.get_config("smca_single_scale_r50_50ep.py")   # a LazyConfig
    model = model_zoo.get("smca_single_scale_r50_50ep.py")        # an SMCADETR

Names are paths relative to the ``configs/`` folder of the source tree (shipped inside the
package): ``smca_multi_scale_r50_50ep.py``, ``demo/smca_r18_synthetic.py``, ...;
:func:`available_configs` lists them.
"""
from .model_zoo import (
    CHECKPOINTS,
    ConfigNotFoundError,
    NoTrainedCheckpointError,
    available_configs,
    get,
    get_checkpoint_url,
    get_config,
    get_config_file,
    resolve_config_file,
)

__all__ = [
    "CHECKPOINTS",
    "ConfigNotFoundError",
    "NoTrainedCheckpointError",
    "available_configs",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "resolve_config_file",
]
