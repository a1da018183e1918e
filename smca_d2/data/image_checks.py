"""Checks that every image file of a dataset exists, opens, is not truncated and has the size its
record says."""

import concurrent.futures
import itertools
import logging
import os
from typing import Dict, Optional, Sequence

from PIL import Image

from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .errors import DatasetValidationError, format_problems
from .images import TRANSPOSING_ORIENTATIONS, exif_orientation

__all__ = ["check_image_files"]

logger = logging.getLogger(__name__)


def _tail_looks_truncated(f, image_format: Optional[str]) -> bool:
    """A cheap test for a cut-off JPEG or PNG: its end marker is missing from the last bytes."""
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND", "MPO": b"\xff\xd9"}.get(image_format)
    if marker is None:
        return False
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 64))
    return marker not in f.read()


def _check_one_image(record: Dict, verify: bool) -> Optional[str]:
    """Problem with one record's image file, or None."""
    file_name = record["file_name"]
    if not os.path.isfile(file_name) and not PathManager.isfile(file_name):
        return f"{file_name}: file not found"
    try:
        with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
            width, height = image.size
            if verify or _tail_looks_truncated(f, image.format):
                image.load()  # full decode: raises on truncated or corrupt data
            orientation = exif_orientation(image)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{file_name}: cannot read the image ({type(e).__name__}: {e})"
    stored = (height, width)
    if orientation in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    expected = (record.get("height"), record.get("width"))
    if None not in expected and expected != (height, width):
        hint = ""
        if orientation in TRANSPOSING_ORIENTATIONS and expected == stored:
            hint = (
                f" The json has the size of the stored pixels, but the EXIF orientation tag ({orientation}) "
                "rotates the image when it is read: the boxes were probably drawn on the unrotated image. "
                "Remove the EXIF orientation tag (or rotate the pixels and boxes) so that they agree."
            )
        return (
            f"{file_name}: the image is {width}x{height} (width x height, after EXIF orientation) but the "
            f"json says {expected[1]}x{expected[0]}.{hint}"
        )
    return None


def check_image_files(
    dataset_dicts: Sequence[Dict], dataset_name: str = "", *, verify: bool = False, num_threads: int = 8
) -> None:
    """Check that every image exists, can be opened, is not truncated and has the size the json
    says. Only headers are read (plus a look at the file's last bytes, which catches JPEG and PNG
    files cut short); ``verify=True`` decodes every image in full.

    In a multi-process job each process checks a share of the images and the problems are
    gathered, so every process raises the same error.

    Raises:
        DatasetValidationError: listing each bad file and its problem.
    """
    records = {}
    for record in dataset_dicts:
        records.setdefault(record["file_name"], record)
    records = list(records.values())
    rank, world = comm.get_rank(), comm.get_world_size()
    mine = records[rank::world]
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        problems = [p for p in pool.map(lambda r: _check_one_image(r, verify), mine) if p]
    if world > 1:
        problems = sorted(itertools.chain.from_iterable(comm.all_gather(problems)))
    if problems:
        raise DatasetValidationError(
            format_problems(
                f"Dataset '{dataset_name}': {len(problems)} of {len(records)} image(s) cannot be used:",
                problems,
                "Fix or remove these images (and their entries in the json) before training.",
            ),
            problems,
        )
    logger.info(
        f"Dataset '{dataset_name}': checked {len(records)} image files" + (" (full decode)." if verify else ".")
    )
