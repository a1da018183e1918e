"""ResumableTrainLoader's size grouping: batches of images of one (rounded) size, every image used,
the same batches after a resume."""

import collections
import itertools

import numpy as np
import pytest

from smca_d2.data import ResumableTrainLoader


def dicts(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"file_name": f"{i}.png", "image_id": i, "height": int(h), "width": int(w)}
        for i, (h, w) in enumerate(rng.integers(96, 161, size=(n, 2)))
    ]


def identity(d):
    return d


def rounded(d, q):
    return (-(-d["height"] // q), -(-d["width"] // q))


@pytest.mark.parametrize("q", [16, 32])
def test_batches_hold_images_of_one_rounded_size(q):
    data = dicts()
    loader = ResumableTrainLoader(data, mapper=identity, total_batch_size=4, size_grouping=q, seed=3)
    batches = list(itertools.islice(loader.position_batches(), 300))
    seen = collections.Counter()
    for batch in batches:
        assert len(batch) == 4
        assert len({rounded(data[index], q) for _, index in batch}) == 1
        seen.update(index for _, index in batch)
    positions = [p for batch in batches for p, _ in batch]
    assert len(set(positions)) == len(positions)  # each position of the stream at most once
    # every image is used, about as often as the others (the shuffled stream, regrouped)
    assert set(seen) == set(range(len(data)))
    assert max(seen.values()) - min(seen.values()) <= 6


def test_less_padding_than_aspect_ratio_grouping():
    data = dicts(400)

    def padded_pixels(loader):
        total = 0
        for batch in itertools.islice(loader.position_batches(), 200):
            h = max(-(-data[i]["height"] // 16) * 16 for _, i in batch)
            w = max(-(-data[i]["width"] // 16) * 16 for _, i in batch)
            total += h * w * len(batch)
        return total

    by_aspect = ResumableTrainLoader(data, mapper=identity, total_batch_size=8, seed=0)
    by_size = ResumableTrainLoader(data, mapper=identity, total_batch_size=8, size_grouping=16, seed=0)
    assert padded_pixels(by_size) < 0.85 * padded_pixels(by_aspect)


def test_resumed_stream_continues_the_same_batches():
    data = dicts()
    first = ResumableTrainLoader(data, mapper=identity, total_batch_size=4, size_grouping=16, seed=5)
    reference = [[d["image_id"] for d in batch] for batch in itertools.islice(iter(first), 12)]
    resumed = ResumableTrainLoader(data, mapper=identity, total_batch_size=4, size_grouping=16, seed=5)
    resumed.set_start(7)
    assert [[d["image_id"] for d in batch] for batch in itertools.islice(iter(resumed), 5)] == reference[7:]


@pytest.mark.parametrize("bad", [0, -16, 1.5, True, "16"])
def test_bad_size_grouping_is_refused(bad):
    with pytest.raises(ValueError, match="size_grouping"):
        ResumableTrainLoader(dicts(10), mapper=identity, total_batch_size=2, size_grouping=bad)
