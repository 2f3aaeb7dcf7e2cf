"""Test-time augmentation and sliding windows (docs/method.md §9) against plain
PyTorch loops in float64, odd sizes, flat memory over the number of views,
bad inputs; their settings (schema, digest) and their use by evaluation and
the pseudo-label pass."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from drsl_fast import cli
from drsl_fast.data import SyntheticPairConfig, make_synthetic_pair
from drsl_fast.pseudo_labels import ClassBalancedThresholds, select_labels
from drsl_fast.sliding_window import sliding_window_logits, tile_starts
from drsl_fast.train.checkpoint import config_digest
from drsl_fast.train.config import load_config
from drsl_fast.train.data import pseudo_label_path, target_dataset
from drsl_fast.train.evaluate import TTA_EVALUATION, evaluated
from drsl_fast.train.label_pass import make_pseudo_labels
from drsl_fast.train.log import quiet_log
from drsl_fast.train.network import seeded_network
from drsl_fast.train.runtime import Runtime
from drsl_fast.train.settings import Settings
from drsl_fast.tta import tta_probabilities

CPU = Runtime(torch.device("cpu"))
PAIR = dict(seed=5, n_source=2, n_target_train=5, n_target_val=3, source_size=(64, 36), target_size=(61, 29))


def strided_net(classes=5, seed=0, dtype=torch.float64):
    """A small fully-convolutional net whose logits are at stride 2 (like a
    segmenter's at stride 8): its output depends on the input's size and borders."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 3, stride=2, padding=1))
    return net.to(dtype).eval()


def reference_tta(net, images, size, scales, flip):
    """The mean over views of softmax(upsampled logits), a plain loop in float64."""
    images = images.double()
    views = []
    for scale in scales:
        h, w = (int(math.floor(n * scale + 0.5)) for n in images.shape[-2:])
        x = images if (h, w) == tuple(images.shape[-2:]) else F.interpolate(images, size=(h, w), mode="bilinear",
                                                                             align_corners=False)
        for mirrored in ([False, True] if flip else [False]):
            logits = net(torch.flip(x, [3])) if mirrored else net(x)
            logits = torch.flip(logits, [3]) if mirrored else logits
            up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            views.append(torch.softmax(up, dim=1))
    return torch.stack(views).mean(0)


@pytest.mark.parametrize("scales, flip", [([1.0], True), ([0.5, 0.75, 1.0, 1.3], False), ([0.6, 1.0, 1.45], True)])
def test_tta_matches_a_plain_loop_in_float64(scales, flip):
    net = strided_net()
    images = torch.randn(2, 3, 37, 53, dtype=torch.float64)
    size = (45, 61)
    got = tta_probabilities(net, images, size, scales, flip)
    assert got.dtype == torch.float32 and got.shape == (2, 5, 45, 61)
    torch.testing.assert_close(got.double(), reference_tta(net, images, size, scales, flip), rtol=0, atol=2e-6)


def test_one_view_is_the_single_scale_softmax_bit_for_bit():
    net = strided_net(dtype=torch.float32)
    images = torch.randn(1, 3, 33, 47)
    plain = F.interpolate(net(images).float(), size=(66, 94), mode="bilinear", align_corners=False).softmax(dim=1)
    assert torch.equal(tta_probabilities(net, images, (66, 94)), plain)


def test_flip_of_a_mirror_symmetric_net_changes_nothing():
    """A net that commutes with mirroring gives the same scores for both views."""
    net = nn.Conv2d(3, 4, 1).double()
    images = torch.randn(1, 3, 20, 31, dtype=torch.float64)
    torch.testing.assert_close(tta_probabilities(net, images, (20, 31), [1.0], True),
                               tta_probabilities(net, images, (20, 31), [1.0], False), rtol=0, atol=1e-6)


def rss_peak_extra(function) -> int:
    """Bytes of this process's resident-set high-water mark above the RSS before ``function`` ran."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS
    with open("/proc/self/statm") as handle:
        before = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    result = function()
    del result
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    return peak - before


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_memory_is_flat_in_the_number_of_views():
    """Score maps of 76 MiB (above glibc's mmap threshold, so freed memory
    leaves the RSS): 2 views and 8 views peak at the same three maps. Each
    peak is the largest of three alternating measurements: pages a call finds
    already resident do not raise the high-water mark (seen once in a full
    run: 2 maps for 2 views, 3 for 8)."""
    classes, size = 19, (1024, 1024)
    one_map = classes * size[0] * size[1] * 4

    def forward(x):  # cheap logits at stride 8
        return F.avg_pool2d(x, 8).repeat(1, 7, 1, 1)[:, :classes]

    images = torch.randn(1, 3, 256, 256)
    tta_probabilities(forward, images, size, [1.0], True)  # warm-up
    few, many = 0, 0
    for _ in range(3):
        few = max(few, rss_peak_extra(lambda: tta_probabilities(forward, images, size, [1.0], True)))
        many = max(many, rss_peak_extra(lambda: tta_probabilities(forward, images, size, [0.25, 0.5, 0.75, 1.0], True)))
    assert few <= 3.5 * one_map and many <= 3.5 * one_map, (few / one_map, many / one_map)
    assert many <= few + 0.5 * one_map, (few / one_map, many / one_map)


@pytest.mark.parametrize("call, error, message", [
    (lambda f, x: tta_probabilities(f, x, (8, 8), []), ValueError, "scales must be a non-empty list"),
    (lambda f, x: tta_probabilities(f, x, (8, 8), [1.0, 0.0]), ValueError, "scales must be a finite number > 0"),
    (lambda f, x: tta_probabilities(f, x, (8, 8), [float("nan")]), ValueError, "scales must be a finite number > 0"),
    (lambda f, x: tta_probabilities(f, x, (8, 8), [1.0], "yes"), TypeError, "flip must be True or False"),
    (lambda f, x: tta_probabilities(f, x, (0, 8)), ValueError, "size must be an int >= 1"),
    (lambda f, x: tta_probabilities(f, x, 8), TypeError, "size must be (H, W)"),
    (lambda f, x: tta_probabilities(f, x[0], (8, 8)), ValueError, "images must be (B, 3, H, W)"),
    (lambda f, x: tta_probabilities(f, x.long(), (8, 8)), TypeError, "images must be a"),
    (lambda f, x: sliding_window_logits(f, x, (4, 4), overlap=1.0), ValueError, "overlap must be a fraction"),
    (lambda f, x: sliding_window_logits(f, x, (4, 4), overlap=-0.1), ValueError, "overlap must be a finite"),
    (lambda f, x: sliding_window_logits(f, x, (0, 4)), ValueError, "window must be an int >= 1"),
    (lambda f, x: sliding_window_logits(f, x, 4), TypeError, "window must be (H, W)"),
])
def test_bad_arguments_are_one_line_errors(call, error, message):
    with pytest.raises(error) as caught:
        call(strided_net(dtype=torch.float32), torch.randn(1, 3, 9, 9))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def reference_windows(net, images, window, overlap):
    """Tiled logits by a plain loop in float64: tiles every floor(T (1 - overlap))
    pixels and one flush with the end, logits upsampled to each tile and averaged."""
    height, width = images.shape[-2:]
    th, tw = min(window[0], height), min(window[1], width)
    rows = list(range(0, height - th, max(1, int(th * (1 - overlap))))) + [height - th]
    columns = list(range(0, width - tw, max(1, int(tw * (1 - overlap))))) + [width - tw]
    total = torch.zeros(images.shape[0], 5, height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    for y in rows:
        for x in columns:
            logits = net(images[:, :, y:y + th, x:x + tw].double())
            total[:, :, y:y + th, x:x + tw] += F.interpolate(logits, size=(th, tw), mode="bilinear",
                                                               align_corners=False)
            count[y:y + th, x:x + tw] += 1
    return total / count


@pytest.mark.parametrize("size, window, overlap", [((70, 45), (32, 24), 0.25), ((41, 97), (41, 30), 0.5),
                                                   ((23, 80), (64, 17), 0.0)])
def test_sliding_window_matches_a_plain_loop_in_float64(size, window, overlap):
    net = strided_net()
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    seen = []

    def forward(x):
        seen.append(tuple(x.shape[-2:]))
        return net(x)

    got = sliding_window_logits(forward, images, window, overlap)
    assert got.shape == (2, 5, *size) and got.dtype == torch.float32
    assert all(h <= window[0] and w <= window[1] for h, w in seen) and len(seen) > 1
    torch.testing.assert_close(got.double(), reference_windows(net, images, window, overlap), rtol=0, atol=2e-6)


def test_tiles_cover_every_pixel_and_end_flush():
    for length, tile, stride in [(10, 4, 3), (9, 4, 4), (4, 4, 1), (3, 4, 2), (100, 33, 24)]:
        starts = tile_starts(length, tile, stride)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered.all() and starts[0] == 0 and starts[-1] == max(length - tile, 0)
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_a_window_of_a_pointwise_net_is_the_whole_image():
    net = nn.Conv2d(3, 5, 1).double()
    images = torch.randn(1, 3, 50, 77, dtype=torch.float64)
    torch.testing.assert_close(sliding_window_logits(net, images, (16, 20), 0.25).double(), net(images),
                               rtol=0, atol=1e-6)


def test_an_input_inside_the_window_is_one_forward():
    net = strided_net()
    images = torch.randn(1, 3, 20, 30, dtype=torch.float64)
    assert torch.equal(sliding_window_logits(net, images, (20, 30)), net(images))


# settings ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("inference.scales=[]", "inference.scales: expected a non-empty list"),
    ("inference.scales=[1.0, -0.5]", "inference.scales: expected a non-empty list without repeats, each a number > 0"),
    ("inference.scales=[1.0, 1.0]", "inference.scales: expected a non-empty list without repeats"),
    ("inference.flip=1", "inference.flip: expected true or false, got 1"),
    ("inference.window=[512]", "inference.window: expected null or a list [H, W]"),
    ("inference.overlap=1", "inference.overlap: expected a number in [0, 1), got 1"),
    ("pseudo_labels.tta=0", "pseudo_labels.tta: expected true or false, got 0"),
    ("evaluation.tta=1", "evaluation.tta: expected true or false, got 1"),
    ("predict.map=variance", 'predict.map: expected one of "none", "confidence", "entropy", got "variance"'),
    ("predict.overlay_alpha=2", "predict.overlay_alpha: expected a number in [0, 1], got 2"),
    ("inference.scale=[1]", "unknown key 'inference.scale'"),
])
def test_bad_settings_are_one_line(capsys, override, message):
    assert cli.main(["config", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("drsl config: ") and message in err[0], err


def test_settings_off_keep_every_run_digest():
    """A run made before these keys existed keeps its digest while TTA
    pseudo-labels and windows are off; evaluation.tta and predict.* never enter it."""
    config = load_config("demo")
    before = copy.deepcopy(config)
    for section, key in [("pseudo_labels", "tta"), ("evaluation", "tta")]:
        del before[section][key]
    del before["inference"], before["predict"]
    digest = config_digest(before)
    assert config_digest(config) == digest
    for same in (["evaluation.tta=true", "predict.tta=true", "predict.map=entropy"], ["inference.scales=[1.0, 2.0]"]):
        assert config_digest(load_config("demo", same)) == digest
    for changed in (["pseudo_labels.tta=true"], ["inference.window=[32, 32]"]):
        assert config_digest(load_config("demo", changed)) != digest


# evaluation and pseudo-labels --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pair"))
    make_synthetic_pair(root, SyntheticPairConfig(**PAIR))
    return root


def tiny_config(pair, out, *changes):
    return load_config("demo", [
        f"output_dir={out}", "device=cpu", "data.synthetic=null", f"data.source.root={pair}/source",
        f"data.target.root={pair}/target", "data.target_size=[24, 48]", "data.workers=0", "data.eval_batch_size=2",
        "model.depth=18", "model.width=0.125", "model.embedding_dim=8", "train.progress=false",
        "train.tensorboard=false", "train.threads=1", "isa.probability=0", "pseudo_labels.isa=false",
        "adaptation.methods=[drsl]",
        "inference.scales=[0.75, 1.0, 1.5]", *changes])


def reference_probabilities(network, image, size, config):
    """TTA probabilities of one (3, h, w) image by the plain float64 loop on the network's segmenter."""
    segmenter = copy.deepcopy(network.segmenter).double()
    settings = config["inference"]
    return reference_tta(lambda x: segmenter(x).logits, image[None], tuple(size), settings["scales"],
                         settings["flip"])


def test_tta_pseudo_labels_feed_the_streaming_thresholds(pair, tmp_path):
    """The pass with pseudo_labels.tta: histograms and selection on the TTA
    probabilities; the same labels as thresholds and selection on the float64
    reference's probabilities, up to pixels within float rounding of a threshold."""
    config = tiny_config(pair, str(tmp_path), "pseudo_labels.tta=true")
    settings = Settings.of(config)
    network = seeded_network(settings, lambda line: None)
    summary = make_pseudo_labels(CPU, settings, network, str(tmp_path / "round"), 0, quiet_log())
    assert summary["tta"] == {"scales": [0.75, 1.0, 1.5], "flip": True}
    dataset = target_dataset(settings.data, "train", with_labels=False)
    probs = []
    for index in range(len(dataset)):
        image = dataset[index]["image"]
        small = F.interpolate(image[None], size=(24, 48), mode="bilinear", align_corners=False)[0]
        probs.append(reference_probabilities(network, small, image.shape[-2:], config).float())
    state = ClassBalancedThresholds(19, "cpu", config["pseudo_labels"]["mantissa_bits"], backend="reference")
    for p in probs:
        state.update(p)
    thresholds = state.thresholds(summary["portion"])
    mismatched = total = 0
    for index, p in enumerate(probs):
        expected = select_labels(p, thresholds, backend="reference")[0].numpy()
        got = np.array(Image.open(pseudo_label_path(str(tmp_path / "round" / "pseudo_labels"),
                                                    dataset.items[index].name)))
        mismatched += int((got != expected).sum())
        total += got.size
    assert mismatched <= 1e-3 * total, mismatched
    plain = make_pseudo_labels(CPU, Settings.of(tiny_config(pair, str(tmp_path))), network, str(tmp_path / "plain"),
                               0, quiet_log())
    assert "tta" not in plain and plain["thresholds"] != summary["thresholds"]


def test_evaluation_reports_tta_beside_single_scale(pair, tmp_path, capsys):
    settings = Settings.of(tiny_config(pair, str(tmp_path), "evaluation.tta=true"))
    network = seeded_network(settings, lambda line: None)
    single = evaluated(CPU, settings, network, str(tmp_path), "tiny", quiet_log())
    with open(tmp_path / TTA_EVALUATION) as handle:
        with_tta = json.load(handle)
    assert with_tta["views"] == {"scales": [0.75, 1.0, 1.5], "flip": True}
    assert set(single) == {"19"} and 0 <= with_tta["19"]["miou"] <= 100
    # the command line: both tables and one line with both mIoUs
    weights = tmp_path / "model.pt"
    torch.save({"model": network.state_dict(), "meta": {}}, weights)
    overrides = [f"output_dir={tmp_path}", "device=cpu", "data.synthetic=null", f"data.target.root={pair}/target",
                 "data.target_size=[24, 48]", "data.workers=0", "model.depth=18", "model.width=0.125",
                 "model.embedding_dim=8", "train.progress=false", "train.tensorboard=false",
                 "inference.scales=[0.75, 1.0, 1.5]", "evaluation.tta=true"]
    assert cli.main(["evaluate", "--weights", str(weights), *overrides]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "single-scale" in line)
    assert line == f"{weights}: mIoU {single['19']['miou']:.1f} single-scale, {with_tta['19']['miou']:.1f} with TTA"
    assert "TTA {'scales': [0.75, 1.0, 1.5], 'flip': True}" in out
