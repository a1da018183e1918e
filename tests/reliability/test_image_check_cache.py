"""Image files are checked once per version of a dataset (smca_d2.data.check_cache): hits,
misses, what invalidates the record, an unwritable cache folder, progress, and two processes
(one looks the record up; without one, both share the check)."""

import json
import logging
import os
import re

import pytest
from reliability_helpers import register, simple_image, unique_name, write_coco

from smca_d2.data import DatasetValidationError, image_checks, validated_dataset_dicts


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("SMCA_D2_DATA_CACHE", str(path))
    return path


@pytest.fixture
def opened(monkeypatch):
    """The image files that the check opens."""
    files, original = [], image_checks._check_one_image
    monkeypatch.setattr(
        image_checks, "_check_one_image", lambda r, verify: files.append(r["file_name"]) or original(r, verify)
    )
    return files


def _dataset(tmp_path, n=3):
    images = [simple_image(i) for i in range(1, n + 1)]
    annotations = [dict(image_id=i, bbox=[1, 1, 10, 10]) for i in range(1, n + 1)]
    json_file, image_dir = write_coco(str(tmp_path / unique_name("d")), images, annotations)
    return register(json_file, image_dir), json_file, image_dir


def test_a_passed_check_is_not_repeated_until_the_files_change(tmp_path, cache_dir, opened, caplog):
    caplog.set_level(logging.INFO, logger="smca_d2.data")
    name, json_file, image_dir = _dataset(tmp_path)
    validated_dataset_dicts(name)
    assert len(opened) == 3
    (record,) = os.listdir(cache_dir / "image_checks")
    assert json.loads((cache_dir / "image_checks" / record).read_text())["images"] == 3
    validated_dataset_dicts(name)
    assert len(opened) == 3 and "passed their check before and have not changed" in caplog.text

    def misses(change):
        before = len(opened)
        change()
        validated_dataset_dicts(name)
        checked = len(opened) - before
        validated_dataset_dicts(name)  # recorded again
        assert len(opened) - before == checked
        return checked == 3

    st = os.stat(json_file)
    assert misses(lambda: os.utime(json_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9)))  # json touched
    extra = os.path.join(image_dir, "extra.png")
    assert misses(lambda: simple_image(9)["pil"].save(extra))  # a file added
    assert misses(lambda: os.remove(extra))  # and removed
    first = os.path.join(image_dir, "0001.png")
    assert misses(lambda: simple_image(1, h=40, w=60)["pil"].rotate(180).save(first))  # rewritten
    # A check with verify=True is not answered by a record without; its own record also
    # answers verify=False.
    before = len(opened)
    validated_dataset_dicts(name, verify_images=True)
    validated_dataset_dicts(name, verify_images=True)
    validated_dataset_dicts(name)
    assert len(opened) - before == 3


def test_problems_are_checked_and_raised_every_time(tmp_path, cache_dir, opened):
    name, _, image_dir = _dataset(tmp_path)
    os.remove(os.path.join(image_dir, "0002.png"))
    for _ in range(2):
        with pytest.raises(DatasetValidationError, match="0002.png: file not found"):
            validated_dataset_dicts(name)
    assert len(opened) == 6 and not (cache_dir / "image_checks").exists()


def test_an_unwritable_cache_folder_only_warns(tmp_path, monkeypatch, opened, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("SMCA_D2_DATA_CACHE", str(blocker / "cache"))  # cannot be created
    name, _, _ = _dataset(tmp_path)
    for _ in range(2):
        assert len(validated_dataset_dicts(name)) == 3
    assert len(opened) == 6 and "cannot record the image check" in caplog.text


def test_no_record_when_the_cache_or_the_check_is_off(tmp_path, cache_dir, opened):
    name, _, _ = _dataset(tmp_path)
    validated_dataset_dicts(name, cache_image_checks=False)
    validated_dataset_dicts(name, cache_image_checks=False)
    validated_dataset_dicts(name, check_images=False)
    assert len(opened) == 6 and not cache_dir.exists()


def _load_on_two_ranks(good, bad, cache, out_dir):
    """One rank of the two-process test: loads ``good`` twice and ``bad`` once."""
    os.environ["SMCA_D2_DATA_CACHE"] = cache
    from detectron2.utils import comm

    opened, original = [], image_checks._check_one_image
    image_checks._check_one_image = lambda r, verify: opened.append(r["file_name"]) or original(r, verify)
    good_name, bad_name = register(*good, name="two_ranks_good"), register(*bad, name="two_ranks_bad")
    validated_dataset_dicts(good_name)
    first = len(opened)
    validated_dataset_dicts(good_name)
    second = len(opened) - first
    try:
        validated_dataset_dicts(bad_name)
        error = None
    except DatasetValidationError as e:
        error = str(e)
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"first": first, "second": second, "error": error}, f)


def test_two_ranks_share_one_check_and_raise_the_same_error(tmp_path):
    from smca_d2.engine import launch

    _, *good = _dataset(tmp_path)
    _, *bad = _dataset(tmp_path)
    os.remove(os.path.join(bad[1], "0003.png"))
    launch(_load_on_two_ranks, 2, dist_url="auto", args=(good, bad, str(tmp_path / "cache"), str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Without a record, the two processes share the check; with it, neither opens a file.
    assert [(r["first"], r["second"]) for r in ranks] == [(2, 0), (1, 0)]
    assert ranks[0]["error"] == ranks[1]["error"] and "0003.png: file not found" in ranks[0]["error"]


def test_a_long_check_logs_progress_with_an_eta(tmp_path, cache_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="smca_d2.data")
    monkeypatch.setattr(image_checks, "_LOG_PERIOD", 0.0)
    monkeypatch.setattr(image_checks, "_CHUNK", 1)
    name, _, _ = _dataset(tmp_path)
    validated_dataset_dicts(name)
    assert re.search(rf"Dataset '{name}': checked 2/3 image files, ETA=\d+:\d\d:\d\d", caplog.text)
