"""Checks that every image file of a dataset exists, opens, is not truncated and has the size its
record says."""

import concurrent.futures
import datetime
import itertools
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .check_cache import ImageCheckCache
from .errors import DatasetValidationError, format_problems
from .images import TRANSPOSING_ORIENTATIONS, exif_orientation

__all__ = ["check_image_files"]

logger = logging.getLogger(__name__)

_LOG_PERIOD = 10.0  # seconds between progress lines of a long check
_CHUNK = 2048  # records handed to the threads at once


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


def _share_of_machine() -> Tuple[int, int]:
    """(this process's index among the processes of its machine, their number). Each machine may
    have its own copy of the data, so each machine checks its own. Without detectron2's local
    process group (a process group made by another launcher), ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE`` tell, or else every process counts as a machine of its own."""
    if comm.get_world_size() == 1:
        return 0, 1
    try:
        return comm.get_local_rank(), comm.get_local_size()
    except AssertionError:  # detectron2 asserts that launch() made the local process group
        if "LOCAL_RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
            return int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
        return 0, 1


def _check_all(records: List[Dict], dataset_name: str, verify: bool, num_threads: int) -> List[str]:
    """The problems of every record's image file, read in ``num_threads`` threads, with progress
    (and an ETA) logged about every ``_LOG_PERIOD`` seconds."""
    problems = []
    start = last_log = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        # In chunks: the pool makes a future per record at once.
        for first in range(0, len(records), _CHUNK):
            chunk = records[first : first + _CHUNK]
            problems += [p for p in pool.map(lambda r: _check_one_image(r, verify), chunk) if p]
            done, now = first + len(chunk), time.perf_counter()
            if now - last_log >= _LOG_PERIOD and done < len(records):
                last_log = now
                eta = datetime.timedelta(seconds=int((now - start) / done * (len(records) - done)))
                logger.info(f"Dataset '{dataset_name}': checked {done}/{len(records)} image files, ETA={eta}")
    return problems


def _recorded_check(cache: ImageCheckCache, dataset_name: str) -> Optional[str]:
    """The record of a passed check of these very files, or None (also when it cannot be read)."""
    try:
        return cache.lookup()
    except Exception as e:  # e.g. the json or a folder vanished meanwhile: the check will tell
        logger.warning(f"Dataset '{dataset_name}': cannot look up an earlier image check ({type(e).__name__}: {e}).")
        return None


def check_image_files(
    dataset_dicts: Sequence[Dict],
    dataset_name: str = "",
    *,
    verify: bool = False,
    num_threads: int = 8,
    json_file: Optional[str] = None,
    use_cache: bool = True,
) -> None:
    """Check that every image exists, can be opened, is not truncated and has the size the json
    says. Only headers are read (plus a look at the file's last bytes, which catches JPEG and PNG
    files cut short); ``verify=True`` decodes every image in full.

    A check that passed is recorded (:class:`~smca_d2.data.check_cache.ImageCheckCache`: the
    json file, the records and the listing of the image folders) and not repeated while the files
    stay the same; ``use_cache=False`` checks every time.

    In a multi-process job the first process of each machine looks for the record while the
    others wait for its answer; without a record, the machine's processes check a share of the
    images each, and the first one records the result. The problems of all processes are
    gathered, so every process raises the same error.

    Raises:
        DatasetValidationError: listing each bad file and its problem.
    """
    records = {}
    for record in dataset_dicts:
        records.setdefault(record["file_name"], record)
    records = list(records.values())
    local_rank, local_size = _share_of_machine()
    world = comm.get_world_size()
    cache = ImageCheckCache(records, dataset_name, json_file, verify) if use_cache and local_rank == 0 else None
    recorded = _recorded_check(cache, dataset_name) if cache is not None else None
    if world > 1:  # every process learns the answer of its machine's first process
        recorded = comm.all_gather(recorded)[comm.get_rank() - local_rank]

    problems, failure = [], None
    if recorded:
        if local_rank == 0:
            logger.info(
                f"Dataset '{dataset_name}': the {len(records)} image files passed their check before and have "
                f"not changed since ({recorded}); not checked again."
            )
    else:
        if local_rank == 0:
            logger.info(
                f"Dataset '{dataset_name}': checking {len(records)} image files"
                + (" (full decode)" if verify else "")
                + (f" in {local_size} processes" if local_size > 1 else "")
                + (
                    "; once they pass, they are not checked again until they change."
                    if cache is not None and cache.usable
                    else "."
                )
            )
        try:
            problems = _check_all(records[local_rank::local_size], dataset_name, verify, num_threads)
        except Exception as e:  # the other processes must not wait for a result that never comes
            failure = e
            problems = [f"the image check failed on rank {comm.get_rank()}: {type(e).__name__}: {e}"]
    if world > 1:
        problems = sorted(set(itertools.chain.from_iterable(comm.all_gather(problems))))
    if failure is not None:
        raise failure
    if problems:
        raise DatasetValidationError(
            format_problems(
                f"Dataset '{dataset_name}': {len(problems)} of {len(records)} image(s) cannot be used:",
                problems,
                "Fix or remove these images (and their entries in the json) before training.",
            ),
            problems,
        )
    if not recorded and local_rank == 0:
        logger.info(
            f"Dataset '{dataset_name}': checked {len(records)} image files" + (" (full decode)." if verify else ".")
        )
        if cache is not None:
            cache.store()
