"""``drsl predict`` on a folder of PNG and JPEG images of mixed and odd sizes:
the label, colour, overlay and map PNGs against the network run by hand,
TTA and sliding windows, the settings read from the weights file (or its
run's config.yaml), unreadable images skipped with one line each, and bad
command lines in one line with exit code 2."""
import copy
import os
import shutil
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from drsl_fast import cli
from drsl_fast.data import TORCHVISION_RGB
from drsl_fast.sliding_window import sliding_window_logits
from drsl_fast.train.checkpoint import config_digest, save_weights
from drsl_fast.train.config import load_config, save_config
from drsl_fast.train.network import network_settings, seeded_network
from drsl_fast.train.settings import Settings
from drsl_fast.train.visualize import palette
from drsl_fast.tta import tta_probabilities

# a tiny model: the demo config says width 0.25 and embedding_dim 32, the file another
TINY = ["model.depth=18", "model.width=0.125", "model.embedding_dim=8", "data.target_size=[24, 40]"]
SIZES = {"a.png": (32, 64), "b.jpg": (37, 53), "sub/c.png": (90, 21), "grey.png": (17, 29), "alpha.png": (40, 40)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A seeded tiny network and its weights file, with the settings saved in it."""
    root = tmp_path_factory.mktemp("model")
    config = load_config("demo", TINY)
    network = seeded_network(Settings.of(config), lambda line: None)
    path = str(root / "model.pt")
    save_weights(network, path, {"stage": "source", "digest": config_digest(config),
                                 "settings": network_settings(config)})
    return network.eval(), config, path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of PNG (RGB, grey, RGBA) and JPEG images of mixed sizes, one in a subfolder."""
    root = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    os.makedirs(root / "sub")
    for name, (height, width) in SIZES.items():
        rgb = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        picture = Image.fromarray(rgb)
        if name.startswith("grey"):
            picture = picture.convert("L")
        if name.startswith("alpha"):
            picture = picture.convert("RGBA")
        picture.save(root / name)
    (root / "notes.txt").write_text("not an image, and not picked from a folder")
    return str(root)


def predicted(network, rgb, target_size, scales=(1.0,), flip=False):
    """Probabilities of the network run by hand: normalised, scaled to the
    target size, TTA views averaged, at the image's own size."""
    image = TORCHVISION_RGB(rgb)[None]
    if target_size is not None:
        image = F.interpolate(image, size=tuple(target_size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        return tta_probabilities(lambda x: network.segmenter(x).logits, image, rgb.shape[:2], list(scales), flip)[0]


def rgb_of(path):
    return np.array(Image.open(path).convert("RGB"))


def run(*args):
    return cli.main(["predict", *args, "device=cpu", "train.progress=false", "train.threads=1"])


def test_a_folder_of_mixed_images(model, images, tmp_path, capsys):
    network, config, weights = model
    out = str(tmp_path / "out")
    assert run("--weights", weights, "--out", out, images, "predict.map=confidence", "data.eval_batch_size=2") == 0
    stdout = capsys.readouterr().out
    assert "5 images" in stdout and "settings from the weights file" in stdout
    for name, (height, width) in SIZES.items():
        stem = os.path.splitext(name)[0]
        label = np.array(Image.open(os.path.join(out, "labels", stem + ".png")))
        assert label.dtype == np.uint8 and label.shape == (height, width)
        probs = predicted(network, rgb_of(os.path.join(images, name)), config["data"]["target_size"])
        np.testing.assert_array_equal(label, probs.argmax(0).numpy())
        colour = np.array(Image.open(os.path.join(out, "colour", stem + ".png")))
        np.testing.assert_array_equal(colour, palette(19)[label])
        confidence = np.array(Image.open(os.path.join(out, "confidence", stem + ".png")))
        np.testing.assert_allclose(confidence, np.rint(probs.max(0).values.numpy() * 255), atol=1)
        overlay = Image.open(os.path.join(out, "overlay", stem + ".png"))
        assert overlay.width > width and overlay.height >= height
        blended = np.array(overlay.convert("RGB"))[:height, :width].astype(float)
        expected = 0.5 * rgb_of(os.path.join(images, name)) + 0.5 * palette(19)[label]
        assert np.abs(blended - expected).max() <= 1
    assert not os.path.exists(os.path.join(out, "entropy"))


def test_tta_windows_and_entropy(model, images, tmp_path):
    """predict.tta with the views of inference.*; at the image's own size
    with windows smaller than the images; the entropy map normalised by log C."""
    network, config, weights = model
    out = str(tmp_path / "out")
    image = os.path.join(images, "a.png")
    assert run("--weights", weights, "--out", out, image, "predict.tta=true", "inference.scales=[0.5, 1.25]",
               "predict.map=entropy") == 0
    probs = predicted(network, rgb_of(image), config["data"]["target_size"], (0.5, 1.25), True)
    np.testing.assert_array_equal(np.array(Image.open(os.path.join(out, "labels", "a.png"))), probs.argmax(0).numpy())
    p = probs.double()
    entropy = -(p * torch.log2(p + 1e-30)).sum(0) / np.log2(19)
    np.testing.assert_allclose(np.array(Image.open(os.path.join(out, "entropy", "a.png"))),
                               np.rint(entropy.numpy() * 255), atol=1)
    assert run("--weights", weights, "--out", out, image, "predict.resize=false", "inference.window=[16, 24]") == 0
    tiles = []

    def forward(x):
        tiles.append(tuple(x.shape[-2:]))
        return network.segmenter(x).logits

    rgb = rgb_of(image)
    with torch.no_grad():
        by_hand = tta_probabilities(partial(sliding_window_logits, forward, window=(16, 24), overlap=0.25),
                                    TORCHVISION_RGB(rgb)[None], rgb.shape[:2])[0]
    assert set(tiles) == {(16, 24)} and len(tiles) == 3 * 4  # rows every 12 px, columns every 18 px
    np.testing.assert_array_equal(np.array(Image.open(os.path.join(out, "labels", "a.png"))),
                                  by_hand.argmax(0).numpy())


def test_unreadable_images_are_skipped_with_one_line_each(model, images, tmp_path, capsys):
    _, _, weights = model
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(open(os.path.join(images, "b.jpg"), "rb").read()[:40])
    out = str(tmp_path / "out")
    assert run("--weights", weights, "--out", out, str(bad), os.path.join(images, "a.png"),
               os.path.join(images, "notes.txt")) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("drsl predict:")]
    assert len(errors) == 3 and all(line.endswith("; skipped") for line in errors), captured.err
    assert any("empty.png" in line for line in errors) and any("notes.txt" in line for line in errors)
    assert "Traceback" not in captured.err and "\r" not in captured.err
    assert "1 images in" in captured.out and "3 unreadable skipped" in captured.out
    assert os.listdir(os.path.join(out, "labels")) == ["a.png"]


def test_settings_come_from_the_file_else_from_its_run(model, images, tmp_path, capsys):
    network, config, _ = model
    image = os.path.join(images, "a.png")
    run_dir = tmp_path / "run"
    bare = str(run_dir / "drsl" / "round_1" / "model.pt")
    save_weights(network, bare, {"stage": "drsl/round_1", "digest": config_digest(config)})
    # no settings in the file, no run config: the demo config's network does not fit the file
    assert run("--weights", bare, "--out", str(tmp_path / "out"), image) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"drsl predict: {bare}: does not fit this model") and "\n" not in line
    save_config(config, str(run_dir / "config.yaml"))
    assert run("--weights", bare, "--out", str(tmp_path / "out"), image) == 0
    assert f"settings from {run_dir / 'config.yaml'}" in capsys.readouterr().out
    other = copy.deepcopy(config)
    other["seed"] = 1  # another run's config: its digest differs, so it is not used
    save_config(other, str(run_dir / "config.yaml"))
    assert run("--weights", bare, "--out", str(tmp_path / "out"), image) == 2
    capsys.readouterr()


@pytest.mark.parametrize("arguments, message", [
    (["{images}/missing.png"], 'INPUT: expected an image file, a folder or a glob pattern, got "{images}/missing.png"'),
    (["{images}/*.gif"], "INPUT: no images"),
    ([], "INPUT: expected at least one image file, folder or glob pattern"),
    (["{images}/a.png", "{images}/sub/../a.png", "{tmp}/copy/a.png"],
     'INPUT: "{images}/a.png" and "{tmp}/copy/a.png" would both be written as "a"'),
    (["--weights", "{images}/none.pt", "{images}"], '--weights: expected an existing file, got "{images}/none.pt"'),
    (["--out", "{images}/a.png", "{images}"], '--out: expected a directory, not a file, got "{images}/a.png"'),
    (["{images}", "predict.map=heat"], 'predict.map: expected one of "none", "confidence", "entropy", got "heat"'),
    (["--weights", "{images}/notes.txt", "{images}"], "{images}/notes.txt: not a readable drsl_fast file"),
])
def test_bad_command_lines_are_one_line(model, images, tmp_path, capsys, arguments, message):
    _, _, weights = model
    os.makedirs(tmp_path / "copy")
    shutil.copy(os.path.join(images, "a.png"), tmp_path / "copy" / "a.png")
    arguments = [a.format(images=images, tmp=tmp_path) for a in arguments]
    if "--weights" not in arguments:
        arguments = ["--weights", weights, *arguments]
    if "--out" not in arguments:
        arguments = ["--out", str(tmp_path / "out"), *arguments]
    assert run(*arguments) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = message.format(images=images, tmp=tmp_path)
    assert len(err) == 1 and err[0].startswith("drsl predict: ") and expected in err[0], err
    assert not os.path.exists(tmp_path / "out" / "labels")


def test_globs_and_a_fresh_process(model, images, tmp_path):
    """As a user runs it: a glob the shell did not expand, in a new process,
    progress as plain lines (stderr is not a terminal)."""
    _, _, weights = model
    out = str(tmp_path / "out")
    done = subprocess.run([sys.executable, "-m", "drsl_fast.cli", "predict", "--weights", weights, "--out", out,
                           os.path.join(images, "*.png"), "device=cpu", "train.threads=1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(os.path.join(out, "labels"))) == ["a.png", "alpha.png", "grey.png"]
    assert "predict: 3/3 in" in done.stderr and "\r" not in done.stderr
