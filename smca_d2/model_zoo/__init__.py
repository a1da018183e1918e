"""smca-d2's configs by name, as in ``detectron2.model_zoo``::

    from smca_d2 import model_zoo

    cfg = model_zoo.get_config("smca_single_scale_r50_50ep.py")   # a LazyConfig
    model = model_zoo.get("smca_single_scale_r50_50ep.py")        # an SMCADETR

Names are paths relative to the ``configs/`` folder of the source tree (shipped inside the
package): ``smca_multi_scale_r50_50ep.py``, ``demo/smca_r18_synthetic.py``, ...;
:func:`available_configs` lists them.
"""

from .model_zoo import *  # noqa: F403
from .model_zoo import __all__  # noqa: F401
