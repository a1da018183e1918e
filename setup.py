#!/usr/bin/env python
"""smca-d2: SMCA-DETR for Detectron2.

detectron2 is not on PyPI under its own name, so it is not a requirement here: install it first
(docs/INSTALL.md). The shipped configs (``configs/``) become package data of
``smca_d2.model_zoo``, as detectron2 does with its model zoo.
"""

import os
import re
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version() -> str:
    with open(os.path.join(HERE, "smca_d2", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def model_zoo_configs():
    """Link (or, where links are not possible, copy) configs/ into smca_d2/model_zoo/configs.

    In an sdist the configs are already there and configs/ is absent: nothing to do.
    """
    source = os.path.join(HERE, "configs")
    target = os.path.join(HERE, "smca_d2", "model_zoo", "configs")
    if os.path.isdir(source):
        if os.path.islink(target):
            os.unlink(target)
        elif os.path.isdir(target):
            shutil.rmtree(target)
        try:
            os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
        except OSError:
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    return ["configs/*.py", "configs/**/*.py"]


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="smca-d2",
    version=version(),
    description="SMCA-DETR (Spatially Modulated Co-Attention) for Detectron2",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["smca_d2", "smca_d2.*"]),
    package_data={"smca_d2.model_zoo": model_zoo_configs()},
    python_requires=">=3.10",
    # Floors are what the code needs: torch 2.4 for torch.amp.custom_fwd(device_type=...) and
    # the fused AdamW on the CPU. No upper pins and no OpenCV variant: the environment's own
    # versions are used (detectron2's own requirements come with detectron2).
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "scipy>=1.7",
        "pycocotools>=2.0.2",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "omegaconf>=2.1",
        "hydra-core>=1.1",
        "Pillow>=7.1",
    ],
    extras_require={
        "plots": ["matplotlib"],
        "export": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
        "test": ["pytest>=7", "pytest-xdist>=3.2", "hypothesis>=6", "matplotlib"],
        "dev": ["pytest>=7", "pytest-xdist>=3.2", "hypothesis>=6", "matplotlib", "ruff>=0.6"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
