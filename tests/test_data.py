"""Dataset loaders on fixtures in the real layouts of docs/method.md §8, label maps,
error handling and the joint training transforms."""

import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from drsl_fast.data import (
    GTA5,
    SYNTHIA,
    TORCHVISION_RGB,
    Cityscapes,
    DatasetLayoutError,
    LabelSizeWarning,
    LabelValueWarning,
    TrainTransform,
    UnreadableFileError,
    reduce_label,
)
from drsl_fast.data.labels import (
    CITYSCAPES_LABELS,
    GTA5_ID_TO_TRAIN_ID,
    SYNTHIA_ID_TO_TRAIN_ID,
    TRAIN_16_TO_13,
    TRAIN_19_TO_16,
)

# docs/method.md §8, written out independently of the implementation.
DOCUMENTED_GTA5 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
             26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
DOCUMENTED_SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12, 19: 13,
                12: 14, 11: 15}  # fmt: skip


def write_rgb(path, height, width, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def write_palette_label(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8))
    image.putpalette(bytes(range(256)) * 3)
    image.save(path)


def write_gray_label(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(ids.astype(np.uint8)).save(path)


def write_png16_rgba(path, channels):
    """Minimal PNG encoder (colour type 6, 16 bits, no filter) so the fixture
    does not depend on the library under test: channels (H, W, 4) uint16 in
    PNG order (R = channel 0)."""
    height, width, _ = channels.shape
    rows = channels.astype(">u2").reshape(height, width * 4).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
        )


# ------------------------------------------------------------------ label maps


def test_label_maps_match_spec():
    assert {k: v for k, v in GTA5_ID_TO_TRAIN_ID.items() if v != 255} == DOCUMENTED_GTA5
    assert {k: v for k, v in SYNTHIA_ID_TO_TRAIN_ID.items() if v != 255} == DOCUMENTED_SYNTHIA
    # Cityscapes official ids agree with the GTA5 map on every evaluated class.
    raw = np.arange(34, dtype=np.uint8)
    mapped, unmapped, _ = CITYSCAPES_LABELS.apply(raw)
    assert unmapped == 0
    assert {int(r): int(t) for r, t in zip(raw, mapped) if t != 255} == DOCUMENTED_GTA5
    assert [TRAIN_19_TO_16[c] for c in (9, 14, 16)] == [255] * 3
    assert [TRAIN_19_TO_16[c] for c in (0, 8, 10, 15, 17, 18)] == [0, 8, 9, 13, 14, 15]
    assert [TRAIN_16_TO_13[c] for c in (3, 4, 5)] == [255] * 3
    assert [TRAIN_16_TO_13[c] for c in (0, 2, 6, 15)] == [0, 2, 3, 12]


def test_out_of_map_values_become_255_and_are_counted():
    mapped, count, values = CITYSCAPES_LABELS.apply(np.array([[7, 40], [200, 26]], np.uint8))
    assert mapped.tolist() == [[0, 255], [255, 13]] and count == 2 and values == (40, 200)


# ------------------------------------------------------------------ GTA5


def make_gta5(root, names=("00001.png", "00002.png"), height=24, width=32):
    ids = np.full((height, width), 7, np.uint8)  # road
    ids[:8] = 23  # sky
    ids[8:12, :10] = 26  # car
    ids[12:14, :4] = 0  # unlabeled
    for i, name in enumerate(names):
        write_rgb(os.path.join(root, "images", name), height, width, seed=i)
        write_palette_label(os.path.join(root, "labels", name), ids)
    expected = np.full((height, width), 0)
    expected[:8], expected[8:12, :10], expected[12:14, :4] = 10, 13, 255
    return expected


def test_gta5_reads_palette_labels_as_train_ids(tmp_path):
    expected = make_gta5(tmp_path)
    dataset = GTA5(str(tmp_path), normalization=TORCHVISION_RGB)
    assert len(dataset) == 2 and dataset.names() == ["00001.png", "00002.png"]
    sample = dataset[0]
    assert sample["image"].shape == (3, 24, 32) and sample["image"].dtype == torch.float32
    assert torch.equal(sample["label"], torch.from_numpy(expected)) and sample["unmapped_pixels"] == 0


def test_gta5_caffe_normalisation_is_bgr_minus_mean(tmp_path):
    make_gta5(tmp_path)
    image = GTA5(str(tmp_path))[0]["image"]
    rgb = np.asarray(Image.open(tmp_path / "images" / "00001.png"))
    assert image[0, 3, 5].item() == pytest.approx(rgb[3, 5, 2] - 104.00698793, abs=1e-4)
    assert image[2, 3, 5].item() == pytest.approx(rgb[3, 5, 0] - 122.67891434, abs=1e-4)


def test_gta5_label_size_mismatch_resized_or_reported(tmp_path):
    make_gta5(tmp_path, names=("00001.png",))
    write_palette_label(str(tmp_path / "labels" / "00001.png"), np.full((26, 33), 26, np.uint8))
    with pytest.warns(LabelSizeWarning, match="00001.png"):
        sample = GTA5(str(tmp_path))[0]
    assert sample["label"].shape == (24, 32) and (sample["label"] == 13).all()
    with pytest.raises(ValueError, match="labels/00001.png"):
        GTA5(str(tmp_path), on_size_mismatch="error")[0]


def test_gta5_list_file_exclude_and_out_of_map_values(tmp_path):
    make_gta5(tmp_path, names=("00001.png", "00002.png", "00003.png"))
    bad = np.full((24, 32), 50, np.uint8)
    bad[0, 0] = 7
    write_palette_label(str(tmp_path / "labels" / "00003.png"), bad)
    (tmp_path / "train.txt").write_text("00001.png\n00002.png\n00003.png\n\n")
    dataset = GTA5(str(tmp_path), list_file=str(tmp_path / "train.txt"), exclude=["00002.png"])
    assert dataset.names() == ["00001.png", "00003.png"]
    with pytest.warns(LabelValueWarning, match=r"00003.png: 767 pixels with values \[50\]"):
        sample = dataset[1]
    assert sample["unmapped_pixels"] == 767 and (sample["label"] == 255).sum() == 767


def test_translated_source_images_are_used_beside_originals(tmp_path):
    expected = make_gta5(tmp_path / "gta5", names=("00001.png",))
    translated = write_rgb(str(tmp_path / "cyclegan" / "00001.png"), 24, 32, seed=9)
    dataset = GTA5(str(tmp_path / "gta5"), translated_root=str(tmp_path / "cyclegan"), normalization=TORCHVISION_RGB)
    assert dataset.names() == ["00001.png", "translated/00001.png"]
    sample = dataset[1]
    assert torch.equal(sample["label"], torch.from_numpy(expected))
    assert sample["image"][0, 0, 0].item() == pytest.approx((translated[0, 0, 0] / 255 - 0.485) / 0.229, abs=1e-5)
    os.remove(tmp_path / "cyclegan" / "00001.png")
    with pytest.raises(DatasetLayoutError, match="cyclegan/00001.png"):
        GTA5(str(tmp_path / "gta5"), translated_root=str(tmp_path / "cyclegan"))


# ------------------------------------------------------------------ SYNTHIA


def test_synthia_reads_first_channel_of_16bit_labels(tmp_path):
    height, width = 10, 12
    raw = np.zeros((height, width, 4), np.uint16)
    raw[..., 0] = np.arange(height * width).reshape(height, width) % 23  # class ids 0..22
    raw[..., 1] = 1000 + np.arange(height * width).reshape(height, width)  # instance ids > 255
    raw[..., 2], raw[..., 3] = 0x1234, 65535
    write_png16_rgba(str(tmp_path / "GT" / "LABELS" / "0000000.png"), raw)
    write_rgb(str(tmp_path / "RGB" / "0000000.png"), height, width)
    sample = SYNTHIA(str(tmp_path))[0]
    lut = np.full(23, 255)
    for k, v in DOCUMENTED_SYNTHIA.items():
        lut[k] = v
    assert torch.equal(sample["label"], torch.from_numpy(lut[raw[..., 0]]))
    assert sample["unmapped_pixels"] == 0

    sample13 = SYNTHIA(str(tmp_path), num_classes=13)[0]
    wall_fence_pole = np.isin(lut[raw[..., 0]], [3, 4, 5])
    assert (sample13["label"][torch.from_numpy(wall_fence_pole)] == 255).all()
    assert sample13["label"][torch.from_numpy(lut[raw[..., 0]] == 15)].unique().tolist() == [12]


# ------------------------------------------------------------------ Cityscapes


def make_cityscapes(root, split="val", cities=("frankfurt", "lindau"), height=16, width=32):
    ids = np.zeros((height, width), np.uint8)
    ids[:, :8], ids[:, 8:16], ids[:, 16:20], ids[:, 20:24], ids[:, 24:] = 7, 22, 27, 4, 33
    for c, city in enumerate(cities):
        stem = f"{city}_000000_{c:06d}"
        write_rgb(os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"), height, width, c)
        write_gray_label(os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"), ids)


def test_cityscapes_layout_and_official_label_ids(tmp_path):
    make_cityscapes(tmp_path)
    dataset = Cityscapes(str(tmp_path), "val")
    assert dataset.names() == [
        "frankfurt/frankfurt_000000_000000_leftImg8bit.png",
        "lindau/lindau_000000_000001_leftImg8bit.png",
    ]
    label = dataset[1]["label"]
    assert [label[0, x].item() for x in (0, 8, 16, 20, 24)] == [0, 9, 14, 255, 18]
    label16 = Cityscapes(str(tmp_path), "val", num_classes=16)[0]["label"]
    assert [label16[0, x].item() for x in (0, 8, 16, 20, 24)] == [0, 255, 255, 255, 15]
    unlabelled = Cityscapes(str(tmp_path), "val", with_labels=False)[0]
    assert "label" not in unlabelled and unlabelled["image"].shape == (3, 16, 32)


def test_cityscapes_list_file_in_advent_format(tmp_path):
    make_cityscapes(tmp_path, split="train")
    (tmp_path / "train.txt").write_text("lindau/lindau_000000_000001_leftImg8bit.png\n")
    dataset = Cityscapes(str(tmp_path), "train", list_file=str(tmp_path / "train.txt"))
    assert len(dataset) == 1 and dataset[0]["label"].shape == (16, 32)


# ------------------------------------------------------------------ errors


def test_missing_root_empty_list_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DatasetLayoutError, match="nowhere"):
        GTA5(str(tmp_path / "nowhere"))
    (tmp_path / "gta" / "images").mkdir(parents=True)
    (tmp_path / "gta" / "labels").mkdir()
    with pytest.raises(ValueError, match="empty"):
        GTA5(str(tmp_path / "gta"))
    make_cityscapes(tmp_path / "cs")
    os.remove(tmp_path / "cs" / "gtFine" / "val" / "lindau" / "lindau_000000_000001_gtFine_labelIds.png")
    with pytest.raises(DatasetLayoutError, match="lindau_000000_000001_gtFine_labelIds.png"):
        Cityscapes(str(tmp_path / "cs"), "val")
    make_gta5(tmp_path / "broken", names=("00001.png",))
    (tmp_path / "broken" / "images" / "00001.png").write_bytes(b"not a png")
    with pytest.raises(UnreadableFileError, match="images/00001.png"):
        GTA5(str(tmp_path / "broken"))[0]
    write_rgb(str(tmp_path / "syn" / "RGB" / "a.png"), 4, 4)
    (tmp_path / "syn" / "GT" / "LABELS").mkdir(parents=True)
    (tmp_path / "syn" / "GT" / "LABELS" / "a.png").write_bytes(b"garbage")
    with pytest.raises(UnreadableFileError, match="LABELS/a.png"):
        SYNTHIA(str(tmp_path / "syn"))[0]


# ------------------------------------------------------------------ transforms


def test_train_transform_moves_image_and_label_together():
    torch.manual_seed(0)
    height, width = 40, 60
    label = torch.randint(0, 19, (height, width))
    image = torch.stack([label.float(), label.float() * 2, torch.zeros(height, width)])
    transform = TrainTransform(crop_size=(24, 30), scale_range=(1.0, 1.0))
    flipped = 0
    for _ in range(20):
        out_image, out_label = transform(image, label)
        assert out_image.shape == (3, 24, 30) and out_label.shape == (24, 30)
        assert torch.equal(out_image[0].long(), out_label) and torch.equal(out_image[1], 2 * out_image[0])
        flipped += not any(
            torch.equal(label[r : r + 24, c : c + 30], out_label) for r in range(height - 23) for c in range(width - 29)
        )
    assert 0 < flipped < 20  # some crops were flipped, some not


def test_train_transform_scales_and_pads_with_ignore():
    torch.manual_seed(1)
    image, label = torch.ones(3, 20, 30), torch.full((20, 30), 3)
    transform = TrainTransform(crop_size=(32, 48), scale_range=(0.5, 1.5), flip=False)
    for _ in range(10):
        out_image, out_label = transform(image, label)
        assert out_image.shape == (3, 32, 48) and out_label.shape == (32, 48)
        assert set(out_label.unique().tolist()) <= {3, 255}
        assert torch.equal(out_image[0] == 0, out_label == 255)  # padding is 0 in the image, 255 in the label
    same = TrainTransform(crop_size=(16, 16))
    a = same(image, label, generator=torch.Generator().manual_seed(5))
    b = same(image, label, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_reduce_label_by_two_is_nearest_on_the_stride_2_grid():
    label = torch.arange(5 * 7).view(5, 7)
    reduced = reduce_label(label)
    assert reduced.shape == (3, 4)
    assert set(reduced.flatten().tolist()) <= set(label.flatten().tolist())
    assert torch.equal(reduce_label(torch.arange(16).view(4, 4)), torch.tensor([[0, 2], [8, 10]]) + 5)


def test_dataset_gives_embedding_labels_with_transform(tmp_path):
    make_gta5(tmp_path)
    dataset = GTA5(str(tmp_path), transform=TrainTransform(crop_size=(16, 20)), embedding_labels=True)
    sample = dataset[0]
    assert sample["label"].shape == (16, 20) and sample["embedding_label"].shape == (8, 10)
    assert torch.equal(sample["embedding_label"], reduce_label(sample["label"]))
