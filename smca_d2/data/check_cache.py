"""A record of image-file checks that passed, so that an unchanged dataset is checked once.

:func:`~smca_d2.data.image_checks.check_image_files` opens every image of a dataset: at COCO's size
that is a hundred thousand files at the start of every run. When a check passes,
:class:`ImageCheckCache` writes a small json under ``$SMCA_D2_DATA_CACHE/image_checks/`` (default
``~/.cache/smca-d2/data``) with a fingerprint of what was checked; a later check of the same dataset
with the same fingerprint is skipped. The fingerprint covers:

* the json file (absolute path, size and modification time), when the dataset has one;
* every record's ``file_name``, ``height`` and ``width`` (what the check compares with);
* the listing of every folder that holds the images: each file's name, size and modification
  time (a file added, removed, replaced or rewritten changes it);
* ``verify`` (a full decode); a check with ``verify=True`` also stands for one without.

A file whose content changes while its size and modification time stay the same (a copy that
preserves times, e.g. ``rsync -a`` of a same-sized file) is not noticed: ``use_cache=False`` (or
``cache_image_checks=False`` of ``validated_dataset_dicts``) checks every time.

Only a check that passed is recorded: a dataset with problems is checked, and refused, every time.
The record is written atomically; a cache folder that cannot be written only costs a warning
(the images are checked again next time). Images on a remote file system (not a local path)
are not cached.
"""

import datetime
import hashlib
import json
import logging
import os
from typing import Dict, Optional, Sequence

from ..checkpoint.safe_load import atomic_write

__all__ = ["ImageCheckCache", "cache_dir"]

logger = logging.getLogger(__name__)

# Part of every fingerprint: a change of what the image check does invalidates all records.
_CHECK_VERSION = 1


def cache_dir() -> str:
    """The folder of smca_d2's data caches: ``$SMCA_D2_DATA_CACHE``, default
    ``$XDG_CACHE_HOME/smca-d2/data`` (``~/.cache/smca-d2/data``, beside the environments that
    ``make`` keeps in ``~/.cache/smca-d2``)."""
    if os.environ.get("SMCA_D2_DATA_CACHE"):
        return os.path.expanduser(os.environ["SMCA_D2_DATA_CACHE"])
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache"), "smca-d2", "data")


def _folder_listing(folder: str) -> str:
    """Name, size and modification time of every entry of ``folder``, one line each, sorted."""
    with os.scandir(folder) as entries:
        lines = []
        for entry in entries:
            st = entry.stat()
            lines.append(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}")
    lines.sort()
    return "\n".join(lines)


class ImageCheckCache:
    """The record of a passed image check of one dataset (see the module's doc).

    Args:
        records: the dataset's records (one per image file), in the order they are checked.
        dataset_name: names the record file, with the json file and the image folders.
        json_file: the dataset's json, if any.
        verify: whether the check decodes every image in full.
        directory: where the records are kept; default ``cache_dir()/image_checks``.
    """

    def __init__(
        self,
        records: Sequence[Dict],
        dataset_name: str,
        json_file: Optional[str] = None,
        verify: bool = False,
        directory: Optional[str] = None,
    ):
        self.dataset_name = dataset_name
        self.verify = verify
        self.directory = directory or os.path.join(cache_dir(), "image_checks")
        self.json_file = os.path.abspath(json_file) if json_file and os.path.isfile(json_file) else None
        self._records = records
        self._folders = sorted({os.path.dirname(os.path.abspath(r["file_name"])) for r in records})
        self._fingerprint = None

    @property
    def usable(self) -> bool:
        """Whether the images are on local folders (others are not cached)."""
        return bool(self._folders) and all(os.path.isdir(f) for f in self._folders)

    def _path(self, verify: bool) -> str:
        identity = "\n".join([self.dataset_name, self.json_file or "", *self._folders, f"verify={verify}"])
        digest = hashlib.sha1(identity.encode()).hexdigest()[:16]
        safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.dataset_name)[:64]
        return os.path.join(self.directory, f"{safe_name}-{digest}.json")

    def fingerprint(self, verify: bool) -> str:
        """The digest of everything the check's outcome depends on (see the module's doc)."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"smca_d2 image check v{_CHECK_VERSION}\n".encode())
            if self.json_file:
                st = os.stat(self.json_file)
                h.update(f"json\0{self.json_file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            records = "\n".join(f"{r['file_name']}\0{r.get('height')}\0{r.get('width')}" for r in self._records)
            h.update(records.encode("utf-8", "surrogateescape"))
            for folder in self._folders:
                h.update(f"\nfolder\0{folder}\n".encode("utf-8", "surrogateescape"))
                h.update(_folder_listing(folder).encode("utf-8", "surrogateescape"))
            self._fingerprint = h.hexdigest()
        return hashlib.sha256(f"{self._fingerprint}\0verify={verify}".encode()).hexdigest()

    def _stored(self, verify: bool) -> Optional[Dict]:
        try:
            with open(self._path(verify)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def lookup(self) -> Optional[str]:
        """The record file of an earlier passed check of these very files, or None."""
        if not self.usable:
            return None
        for verify in [self.verify] if self.verify else [False, True]:
            stored = self._stored(verify)
            if stored and stored.get("fingerprint") == self.fingerprint(verify):
                return self._path(verify)
        return None

    def store(self) -> None:
        """Record that the check passed. Never raises for a folder that cannot be written."""
        if not self.usable:
            return
        path = self._path(self.verify)
        record = {
            "fingerprint": self.fingerprint(self.verify),
            "dataset": self.dataset_name,
            "json_file": self.json_file,
            "image_folders": self._folders,
            "images": len(self._records),
            "verify": self.verify,
            "checked": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        try:
            os.makedirs(self.directory, exist_ok=True)
            atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
        except OSError as e:
            logger.warning(
                f"Dataset '{self.dataset_name}': cannot record the image check in {path} ({e}); the image files "
                "will be checked again next time. Set SMCA_D2_DATA_CACHE to a writable folder to keep the record."
            )
