"""Datasets: the procedural shapes are deterministic, balanced and in range; natural crops come from
the bundled photographs with a disjoint held-out split; image folders load in the usual layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagefolder.data import (
    SHAPE_CLASSES,
    DataError,
    FolderDataset,
    NaturalCropsDataset,
    ShapesDataset,
    collate,
    open_dataset,
)


def test_shapes_deterministic_balanced_in_range():
    a, b = ShapesDataset(64, seed=0), ShapesDataset(64, seed=0)
    img, labels = collate(a, list(range(20)))
    assert img.shape == (20, 3, 64, 64) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    assert labels.tolist() == [i % 10 for i in range(20)] and len(SHAPE_CLASSES) == 10
    assert torch.equal(img, collate(b, list(range(20)))[0])
    assert not torch.equal(img, collate(ShapesDataset(64, seed=1), list(range(20)))[0])
    assert ShapesDataset(32)[3][0].shape == (3, 32, 32)


def test_shape_classes_are_distinct():
    # Mean foreground masks of different classes differ clearly (the classes are told apart by geometry).
    data = ShapesDataset(32)
    masks = []
    for cls in range(10):
        imgs = torch.stack([data[cls + 10 * k][0] for k in range(8)])
        masks.append((imgs.std(dim=1) > 0.05).float().mean(0).flatten())
    dist = torch.cdist(torch.stack(masks), torch.stack(masks))
    assert dist[~torch.eye(10, dtype=torch.bool)].min() > 1.0


def test_natural_crops_from_bundled_photos():
    pytest.importorskip("skimage")
    train, held = NaturalCropsDataset(64, length=8), NaturalCropsDataset(64, length=8, holdout=True)
    img, labels = collate(train, list(range(8)))
    assert img.shape == (8, 3, 64, 64) and labels.eq(0).all()
    assert img.min() >= -1 and img.max() <= 1 and img.std() > 0.05
    assert not torch.equal(img, collate(held, list(range(8)))[0])
    assert torch.equal(img[0], train[0][0])


def test_folder_dataset(tmp_path):
    for cls, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cats" / "notes.txt").write_text("ignored")
    data = open_dataset(str(tmp_path), 16)
    assert isinstance(data, FolderDataset) and data.classes == ["cats", "dogs"] and len(data) == 4
    img, label = data[3]
    assert img.shape == (3, 16, 16) and label == 1
    assert np.allclose(img[:, 5, 5].numpy(), [-1, -1, 1], atol=0.02)


def test_open_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        open_dataset("nope", 64)
    with pytest.raises(DataError, match="no images"):
        FolderDataset(tmp_path)
    with pytest.raises(IndexError):
        ShapesDataset(64, length=5)[5]
