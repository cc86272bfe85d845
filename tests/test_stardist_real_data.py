"""Real training nuclei: index reading, appearance groups, the group split, rescaling."""

from __future__ import annotations

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")

from tme_pipeline.segment.train.real import (  # noqa: E402
    RealRecord, appearance_groups, read_index, real_images, rescale_pair, split_by_group,
)

HEADER = "image_id,height,width,n_nuclei,mean_intensity,median_equiv_diameter_px\n"


def _disc_image(shape, centres, radius, level):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = np.full(shape, 5, np.uint8)
    lbl = np.zeros(shape, np.uint16)
    for i, (cy, cx) in enumerate(centres, 1):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        img[inside] = level
        lbl[inside] = i
    return img, lbl


def _write_set(folder, kinds):
    """A tiny shared-set folder: each kind (radius, level, shape) repeated as near-duplicate fields."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    lines = []
    for k, (radius, level, shape, copies) in enumerate(kinds):
        for c in range(copies):
            centres = [(shape[0] // 4 + c, shape[1] // 4), (3 * shape[0] // 4, 3 * shape[1] // 4 - c)]
            img, lbl = _disc_image(shape, centres, radius, level)
            name = f"k{k}c{c}"
            tifffile.imwrite(folder / "images" / f"{name}.tif", img)
            tifffile.imwrite(folder / "masks" / f"{name}.tif", lbl)
            d = 2 * np.sqrt((lbl == 1).sum() / np.pi)
            lines.append(f"{name},{shape[0]},{shape[1]},2,{img.mean():.3f},{d:.2f}\n")
    (folder / "index.csv").write_text(HEADER + "".join(lines))


KINDS = [(4, 60, (64, 64), 5), (12, 200, (128, 160), 5), (7, 120, (96, 96), 5), (20, 250, (200, 200), 5)]


def test_read_index_and_errors(tmp_path):
    _write_set(tmp_path / "set", KINDS)
    records = read_index(tmp_path / "set")
    assert len(records) == 20 and records[0].image_id == "k0c0" and records[0].height == 64
    with pytest.raises(FileNotFoundError, match="index.csv"):
        read_index(tmp_path / "nothing")
    (tmp_path / "set" / "index.csv").write_text(HEADER + "x,1,1,not-a-number,1,1\n")
    with pytest.raises(ValueError, match="index.csv: unreadable row"):
        read_index(tmp_path / "set")


def test_near_duplicates_share_a_group_and_never_straddle_the_split(tmp_path):
    _write_set(tmp_path / "set", KINDS)
    records = read_index(tmp_path / "set")
    groups = appearance_groups(tmp_path / "set", records, n_groups=4)
    kind = np.array([int(r.image_id[1]) for r in records])
    # The four kinds of field are told apart, and each kind's copies stay together.
    assert all(len(set(groups[kind == k])) == 1 for k in range(4))
    assert len(set(groups)) == 4
    split = split_by_group(groups, val_fraction=0.2, test_fraction=0.2, seed=3)
    sides = {name: set(groups[idx]) for name, idx in split.items()}
    assert not (sides["train"] & sides["val"]) and not (sides["train"] & sides["test"])
    assert not (sides["val"] & sides["test"])
    assert sorted(np.concatenate(list(split.values()))) == list(range(len(records)))
    assert len(split["test"]) >= 4 and len(split["val"]) >= 4 and len(split["train"]) > 0


def test_split_is_reproducible_and_seeded():
    groups = np.repeat(np.arange(1, 21), 5)
    a = split_by_group(groups, seed=1)
    b = split_by_group(groups, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = split_by_group(groups, seed=2)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_rescale_brings_nuclei_to_the_target_diameter(tmp_path):
    _write_set(tmp_path / "set", [(20, 250, (200, 200), 1), (4, 60, (64, 64), 1)])
    records = read_index(tmp_path / "set")
    images = real_images(tmp_path / "set", records, target_diameter_px=16.0, min_edge_px=100)
    for im in images:
        areas = np.bincount(im.label_image.ravel())[1:]
        diam = 2 * np.sqrt(np.median(areas) / np.pi)
        assert abs(diam - 16.0) < 1.5
        assert min(im.image.shape) >= 100 and im.pixel_um == 0.5
        assert set(np.unique(im.label_image)) == {0, 1, 2}
    # The large-nucleus field shrank to 80 px and was padded with background and empty
    # labels, not stretched; the small-nucleus field grew past 100 px and needed no pad.
    padded = images[0]
    grown = round(64 * 16.0 / records[1].median_diameter_px)
    assert padded.image.shape == (100, 100) and images[1].image.shape == (grown, grown) and grown > 100
    assert (padded.label_image[80:] == 0).all() and (padded.label_image[:, 80:] == 0).all()
    assert np.allclose(padded.image[85:], padded.image[99, 99])


def test_rescale_pair_keeps_labels_integral():
    img = np.zeros((40, 40), np.float32)
    lbl = np.zeros((40, 40), np.uint16)
    lbl[10:20, 10:20] = 7
    img[lbl > 0] = 1.0
    x, y = rescale_pair(img, lbl, 0.5)
    assert x.shape == y.shape == (20, 20)
    assert set(np.unique(y)) == {0, 7}
    assert (y == 7).sum() == 25


def test_record_is_plain_data():
    r = RealRecord("a", 2, 3, 1, 1.0, 4.0)
    assert r.median_diameter_px == 4.0
