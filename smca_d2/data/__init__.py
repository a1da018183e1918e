"""Dataset tooling: synthetic COCO-format data and converters for small real datasets."""
