"""torchvision ResNet ImageNet weights -> Detectron2's ResNet backbone keys.

torchvision's ``resnet{18,34,50,101,152}`` state dicts (``conv1``, ``bn1``, ``layer1..4``,
``fc``) map one to one onto Detectron2's ``ResNet`` built with ``stride_in_1x1=False`` (the
stride in the 3x3 conv, as in torchvision and in smca_d2's configs):

==============================  =========================================
torchvision                     Detectron2 (under ``backbone.``)
==============================  =========================================
``conv1.weight``                ``stem.conv1.weight``
``bn1.*``                       ``stem.conv1.norm.*``
``layerN.B.convK.weight``       ``res{N+1}.B.convK.weight``
``layerN.B.bnK.*``              ``res{N+1}.B.convK.norm.*``
``layerN.B.downsample.0.*``     ``res{N+1}.B.shortcut.weight``
``layerN.B.downsample.1.*``     ``res{N+1}.B.shortcut.norm.*``
``fc.*``, ``*.num_batches_tracked``  dropped
==============================  =========================================

BN tensors are ``weight``, ``bias``, ``running_mean``, ``running_var``; torchvision's BN and
Detectron2's ``FrozenBN`` use the same ``eps`` (1e-5), so the converted backbone computes the same
features as torchvision's model in eval mode. The result is a Detectron2 checkpoint
(``{"model": ..., "__author__": ...}``) that ``DetectionCheckpointer`` loads by exact key names
(no matching heuristics), e.g. as ``train.init_checkpoint``.
"""

import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple

import torch

__all__ = ["RESNET_BLOCKS", "convert_torchvision_resnet", "load_torchvision_state_dict", "resnet_depth"]

# depth -> (blocks per stage, bottleneck)
RESNET_BLOCKS: Dict[int, Tuple[Tuple[int, ...], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.(.+)")


def map_torchvision_resnet_key(key: str) -> Optional[str]:
    """Detectron2 name (without ``backbone.``) of a torchvision key; None for keys to drop;
    raises KeyError for keys that are not part of a torchvision ResNet."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1.") and key[4:] in _BN_FIELDS:
        return "stem.conv1.norm." + key[4:]
    m = _BLOCK.fullmatch(key)
    if m:
        stage, block, name = f"res{int(m.group(1)) + 1}", m.group(2), m.group(3)
        conv = re.fullmatch(r"conv([123])\.weight", name)
        if conv:
            return f"{stage}.{block}.conv{conv.group(1)}.weight"
        bn = re.fullmatch(r"bn([123])\.(\w+)", name)
        if bn and bn.group(2) in _BN_FIELDS:
            return f"{stage}.{block}.conv{bn.group(1)}.norm.{bn.group(2)}"
        if name == "downsample.0.weight":
            return f"{stage}.{block}.shortcut.weight"
        down = re.fullmatch(r"downsample\.1\.(\w+)", name)
        if down and down.group(1) in _BN_FIELDS:
            return f"{stage}.{block}.shortcut.norm.{down.group(1)}"
    raise KeyError(f"{key!r} is not a key of a torchvision ResNet")


def resnet_depth(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The depth (18/34/50/101/152) of a torchvision ResNet state dict, from its blocks."""
    blocks = [0, 0, 0, 0]
    for key in state_dict:
        m = _BLOCK.fullmatch(key)
        if m:
            stage, block = int(m.group(1)) - 1, int(m.group(2))
            blocks[stage] = max(blocks[stage], block + 1)
    bottleneck = any(k.endswith("conv3.weight") for k in state_dict)
    for depth, (expected, is_bottleneck) in RESNET_BLOCKS.items():
        if tuple(blocks) == expected and bottleneck == is_bottleneck:
            return depth
    kind = "bottleneck" if bottleneck else "basic"
    raise ValueError(f"not a torchvision ResNet: {kind} blocks per stage {tuple(blocks)}")


def convert_torchvision_resnet(
    state_dict: Mapping[str, torch.Tensor], depth: Optional[int] = None, prefix: str = "backbone."
) -> "OrderedDict[str, torch.Tensor]":
    """Map a torchvision ResNet state dict to Detectron2's ResNet keys.

    Args:
        state_dict: e.g. ``torchvision.models.resnet50().state_dict()`` or the ImageNet file.
        depth: expected depth (checked against the blocks found); None: inferred.
        prefix: prepended to every key ("backbone." for the backbone of a Detectron2 model).

    Returns:
        the converted state dict (``fc`` and ``num_batches_tracked`` dropped).

    Raises:
        ValueError: the state dict is not a torchvision ResNet of ``depth``.
        KeyError: it holds a key a torchvision ResNet does not have.
    """
    found = resnet_depth(state_dict)
    if depth is not None and depth != found:
        raise ValueError(f"expected a ResNet-{depth}, the state dict is a ResNet-{found}")
    converted = OrderedDict()
    for key, value in state_dict.items():
        name = map_torchvision_resnet_key(key)
        if name is not None:
            converted[prefix + name] = value
    return converted


def load_torchvision_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a torchvision checkpoint with ``torch.load(weights_only=True)``: a bare state dict,
    or one under ``"state_dict"`` / ``"model"``; a ``module.`` prefix (DataParallel) is removed."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module.") :]: v for k, v in data.items()}
    return data
