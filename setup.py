#!/usr/bin/env python
from setuptools import find_packages, setup

# detectron2 is not on PyPI under its own name: install it first (see README.md, "Install").
setup(
    name="smca-d2",
    version="0.1.0",
    description="SMCA-DETR (Spatially Modulated Co-Attention) for Detectron2",
    packages=find_packages(include=["smca_d2", "smca_d2.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "numpy",
        "scipy>=1.7",
        "pycocotools>=2.0.2",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "omegaconf>=2.1",
        "hydra-core>=1.1",
        "Pillow>=7.1",
        "opencv-python-headless",
        "matplotlib",
        "setuptools<81",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
)
