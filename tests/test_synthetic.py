"""The built-in synthetic domain pair: deterministic, in the real layouts, read
by the real loaders, with the required classes, modes and a domain shift."""

import hashlib
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from drsl_fast.cli import main as drsl_main
from drsl_fast.data import GTA5, Cityscapes, SyntheticPairConfig, make_synthetic_pair
from drsl_fast.data.labels import CITYSCAPES_ID
from drsl_fast.data.synthetic import MODE_COLOURS, SOURCE_STYLE, TARGET_STYLE, render_scene, scene_rng, target_style

SMALL = SyntheticPairConfig(
    seed=3, n_source=4, n_target_train=3, n_target_val=2, source_size=(96, 54), target_size=(96, 48)
)
REQUIRED = ("road", "sidewalk", "building", "vegetation", "sky", "car", "person", "pole", "traffic sign")


def tree_digest(root):
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path):
    make_synthetic_pair(str(tmp_path / "a"), SMALL)
    make_synthetic_pair(str(tmp_path / "b"), SMALL)
    make_synthetic_pair(str(tmp_path / "c"), SyntheticPairConfig(**{**SMALL.__dict__, "seed": 4}))
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_pair_is_read_by_the_real_loaders(tmp_path):
    roots = make_synthetic_pair(str(tmp_path), SMALL)
    source = GTA5(roots["source"])
    assert len(source) == 4 and source[0]["image"].shape == (3, 54, 96)
    for split, count in (("train", 3), ("val", 2)):
        target = Cityscapes(roots["target"], split)
        assert len(target) == count and target[0]["image"].shape == (3, 48, 96)
    labels = [s["label"] for s in (source[i] for i in range(4))]
    assert all(s["unmapped_pixels"] == 0 for s in source)
    assert all(((label < 19) | (label == 255)).all() for label in labels)
    assert (Cityscapes(roots["target"], "val")[0]["label"] == 255).any()  # ego-vehicle hood is ignored


def test_scenes_contain_the_street_classes_in_several_modes():
    seen = set()
    for index in range(12):
        _, ids = render_scene(scene_rng(0, "source", index), SOURCE_STYLE, 128, 256)
        seen |= set(np.unique(ids).tolist())
    assert {CITYSCAPES_ID[name] for name in REQUIRED} <= seen
    assert len(MODE_COLOURS["car"]) == 3 and len(MODE_COLOURS["building"]) == 3
    assert all(len(MODE_COLOURS[name]) >= 2 for name in REQUIRED)


def test_target_is_a_shifted_domain():
    def saturation(style, split):
        rgbs = [render_scene(scene_rng(0, split, i), style, 64, 128)[0].astype(np.float64) for i in range(6)]
        return np.mean([(r.max(-1) - r.min(-1)).mean() for r in rgbs])

    assert saturation(TARGET_STYLE, "target_val") < 0.8 * saturation(SOURCE_STYLE, "source")
    assert TARGET_STYLE.mode_weights["car"] != SOURCE_STYLE.mode_weights["car"]
    assert TARGET_STYLE.noise > 0 and TARGET_STYLE.blur > 0 and SOURCE_STYLE.noise == SOURCE_STYLE.blur == 0


def test_target_style_changes_vary_the_target_only(tmp_path):
    assert target_style(None) is TARGET_STYLE
    style = target_style({"lighting": 0, "colour_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                          "mode_weights": {"sky": [1, 0]}})
    assert style.lighting == 0 and style.colour_matrix == ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    assert style.mode_weights["sky"] == (1, 0) and style.mode_weights["car"] == TARGET_STYLE.mode_weights["car"]
    with pytest.raises(ValueError, match="unknown DomainStyle fields"):
        target_style({"lightning": 0})

    plain, changed = tmp_path / "plain", tmp_path / "changed"
    make_synthetic_pair(str(plain), SMALL)
    make_synthetic_pair(str(changed), replace(SMALL, target_style={"noise": 0.0, "blur": 0.0}))
    assert tree_digest(plain / "source") == tree_digest(changed / "source")
    for split in ("train", "val"):  # same scenes and labels, other pixels
        assert tree_digest(plain / "target" / "gtFine" / split) == tree_digest(changed / "target" / "gtFine" / split)
        assert tree_digest(plain / "target" / "leftImg8bit" / split) != tree_digest(
            changed / "target" / "leftImg8bit" / split)


def test_cli_data_synth_writes_both_layouts(tmp_path, capsys):
    code = drsl_main(
        ["data", "synth", "--out", str(tmp_path), "--seed", "1", "--n-source", "2", "--n-target-train", "1",
         "--n-target-val", "1", "--source-size", "64x36", "--target-size", "64x32"]
    )  # fmt: skip
    assert code == 0 and "GTA5 layout" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "source" / "labels")) == ["00001.png", "00002.png"]
    val = tmp_path / "target" / "gtFine" / "val" / "synthval" / "synthval_000000_000000_gtFine_labelIds.png"
    assert val.is_file() and (tmp_path / "synthetic_pair.json").is_file()
    assert torch.is_tensor(Cityscapes(str(tmp_path / "target"), "train")[0]["label"])
