"""Built-in ISA by FDA in training and on disk (docs/method.md §6): the
translation of normalised batches, the draws, ``drsl data translate``, and
the pipeline with ISA on and off."""
import json
import os

import numpy as np
import torch
from PIL import Image

from drsl_fast import cli
from drsl_fast.data import CAFFE_BGR, TORCHVISION_RGB, GTA5, SyntheticPairConfig, make_synthetic_pair
from drsl_fast.data.transforms import resize_pair
from drsl_fast.ops.fda import fourier_domain_adaptation
from drsl_fast.train import isa
from drsl_fast.train.checkpoint import config_digest
from drsl_fast.train.config import load_config
from drsl_fast.train.data import AugmentedSamples, source_dataset, target_dataset
from drsl_fast.train.data import normalization as config_normalization
from drsl_fast.train.settings import Settings

from test_pipeline_run import tiny, weights


def rgb(seed, low, high, size=(24, 20)):
    return np.random.default_rng(seed).uniform(low, high, (*size, 3))


def pair_on_disk(data, seed, n_source, source_size, *settings):
    """A small synthetic pair written to ``data``; returns the overrides of
    the demo config that read it (the run writes no pair of its own)."""
    make_synthetic_pair(str(data), SyntheticPairConfig(seed=seed, n_source=n_source, n_target_train=3, n_target_val=1,
                                                       source_size=source_size, target_size=(64, 32)))
    return [f"data.source.root={data / 'source'}", f"data.target.root={data / 'target'}", "data.synthetic=null",
            *settings]


def test_translate_batch_runs_fda_on_the_unnormalised_images():
    """A dark source and a bright target: FDA of the 0-255 images, normalised,
    for the flagged image; the other is untouched. FDA of the mean-subtracted
    tensors would differ (the sign of the DC term, docs/method.md §6)."""
    source, target = rgb(0, 0, 60), rgb(1, 180, 255, (30, 40))
    for normalization in (CAFFE_BGR, TORCHVISION_RGB):
        images = torch.stack([normalization(source), normalization(rgb(2, 0, 255))])
        targets = torch.stack([normalization(target), normalization(target)])
        targets = torch.nn.functional.interpolate(targets, size=(24, 20), mode="bilinear", align_corners=False)
        batch = {"image": images, "isa_target": targets, "isa": torch.tensor([True, False])}
        out = isa.translate_batch(batch, 0.1, normalization)["image"]
        raw = fourier_domain_adaptation(torch.from_numpy(source).permute(2, 0, 1)[None],
                                        torch.from_numpy(target).permute(2, 0, 1)[None].double(), 0.1)
        expected = normalization(raw[0].permute(1, 2, 0).numpy())
        assert torch.allclose(out[0], expected, atol=1e-4 * (255 if normalization is CAFFE_BGR else 1))
        assert torch.equal(out[1], images[1])
        naive = fourier_domain_adaptation(images[:1], targets[:1], 0.1)[0]
        assert not torch.allclose(naive, expected, atol=1.0 if normalization is CAFFE_BGR else 0.1)


def test_draws_come_from_the_sample_seed_and_nothing_when_off(tmp_path):
    assert [isa.draw(seed, 0.0, 5) for seed in range(50)] == [None] * 50
    drawn = [isa.draw(seed, 1.0, 5) for seed in range(50)]
    assert drawn == [isa.draw(seed, 1.0, 5) for seed in range(50)] and set(drawn) == set(range(5))
    share = np.mean([isa.draw(seed, 0.3, 5) is not None for seed in range(2000)])
    assert 0.25 < share < 0.35
    config = load_config("demo", tiny(str(tmp_path), str(tmp_path / "run")))
    off = Settings.of(config)
    assert not isa.active(off.isa, off.data.source, "source") and not isa.active(off.isa, off.data.source, "adaptation")
    on = Settings.of(load_config("demo", tiny(str(tmp_path), str(tmp_path / "run"), **{"isa.probability": 0.5})))
    assert isa.active(on.isa, on.data.source, "adaptation") and not isa.active(on.isa, on.data.source, "source")
    # ISA off keeps the settings digest of runs from before it (their model files load)
    assert config_digest(config) == config_digest({k: v for k, v in config.items() if k != "isa"})
    labels = dict(config["pseudo_labels"])
    assert labels.pop("isa") is False
    assert config_digest(config) == config_digest(dict(config, pseudo_labels=labels))
    # where ISA is used, its settings are: on the pass, or with a translated directory (isa.stages)
    for used in (["pseudo_labels.isa=true"], ["data.source.translated_root=elsewhere"]):
        changed = load_config("demo", tiny(str(tmp_path), str(tmp_path / "run"), **{"isa.stages": "both"}) + used)
        again = load_config("demo", tiny(str(tmp_path), str(tmp_path / "run")) + used)
        assert config_digest(changed) != config_digest(again) != config_digest(config)


def test_stage_samples_follow_isa_stages_and_a_translated_directory_replaces_fda(tmp_path):
    """FDA wraps the samples of the stages in isa.stages; a directory of
    translated images stands beside the originals in those stages instead,
    and FDA is then off."""
    data, translated = tmp_path / "data", tmp_path / "translated"
    base = pair_on_disk(data, 1, 4, (48, 30))
    assert cli.main(["data", "translate", "--out", str(translated), *base]) == 0
    off, fda, directory = (Settings.of(load_config("demo", base + changes)) for changes in (
        ["isa.probability=0", "adaptation.methods=[drsl]"],
        ["isa.probability=0.5"], ["isa.probability=0.5", f"data.source.translated_root={translated}"]))
    for stage in ("source", "adaptation"):
        samples = isa.samples(off.data, off.isa, stage)
        assert type(samples) is AugmentedSamples and len(samples) == 4
    assert type(isa.samples(fda.data, fda.isa, "source")) is AugmentedSamples
    assert isinstance(isa.samples(fda.data, fda.isa, "adaptation"), isa.TranslatableSamples)
    assert not isa.active(directory.isa, directory.data.source, "adaptation")
    assert type(isa.samples(directory.data, directory.isa, "adaptation")) is AugmentedSamples
    assert [len(isa.samples(directory.data, directory.isa, stage)) for stage in ("source", "adaptation")] == [4, 8]


def test_data_translate_writes_the_op_output(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "translated"
    settings = pair_on_disk(data, 1, 4, (48, 30), "isa.fda_beta=0.1", "seed=7")
    assert cli.main(["data", "translate", "--out", str(out), *settings]) == 0
    err = capsys.readouterr().err
    assert "drsl data translate: 4/4" in err and "\r" not in err
    config = load_config("demo", settings)
    targets = target_dataset(Settings.of(config).data, "train", with_labels=False).items
    sources = GTA5(str(data / "source")).items
    for item in sources:
        target = targets[isa.pairing_index(7, item.name, len(targets))]
        expected = fourier_domain_adaptation(isa.rgb_tensor(item.image), isa.rgb_tensor(target.image), 0.1)
        expected = expected[0].permute(1, 2, 0).clamp(0, 255).numpy()
        written = np.asarray(Image.open(out / item.name))
        assert written.dtype == np.uint8 and written.shape == expected.shape
        assert np.abs(written - expected).max() <= 0.5 + 1e-3
    assert len(GTA5(str(data / "source"), translated_root=str(out))) == 2 * len(sources)
    assert cli.main(["data", "translate", "--out", str(out), "data.source.root=" + str(tmp_path / "none")]) == 2


def test_on_the_fly_and_on_disk_translations_agree(tmp_path):
    """A source image and its paired target image: the training path
    (normalised tensors, the target resized by the loader, translate_batch)
    gives the image ``drsl data translate`` writes, up to its uint8 rounding."""
    data, out = tmp_path / "data", tmp_path / "translated"
    settings = pair_on_disk(data, 4, 3, (40, 24), "isa.fda_beta=0.1", "seed=3")
    assert cli.main(["data", "translate", "--out", str(out), *settings]) == 0
    targets = target_dataset(Settings.of(load_config("demo", settings)).data, "train", with_labels=False).items
    for normalization in (TORCHVISION_RGB, CAFFE_BGR):
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (normalization.mean, normalization.std))
        for item in GTA5(str(data / "source")).items:
            target = targets[isa.pairing_index(3, item.name, len(targets))]
            image = normalization(np.asarray(Image.open(item.image).convert("RGB")))
            paired = normalization(np.asarray(Image.open(target.image).convert("RGB")))
            paired = resize_pair(paired, None, tuple(image.shape[-2:]))[0]
            batch = {"image": image[None], "isa_target": paired[None], "isa": torch.tensor([True])}
            rgb = (isa.translate_batch(batch, 0.1, normalization)["image"][0] * std + mean) / normalization.scale
            rgb = (rgb.flip(0) if normalization.bgr else rgb).permute(1, 2, 0).clamp(0, 255).numpy()
            written = np.asarray(Image.open(out / item.name)).astype(np.float32)
            assert np.abs(written - rgb).max() <= 0.5 + 1e-2


def test_pipeline_with_isa_on_and_off(tmp_path):
    one_round = {"adaptation.rounds": 1, "adaptation.methods": "[drsl, intrada]", "intrada.inter_iterations": 2,
                 "intrada.intra_iterations": 2, "intrada.batch_size": 2, "intrada.discriminator_width": 0.125}
    runs = {"default": {}, "off": {"isa.probability": 0, "isa.stages": "both", "isa.fda_beta": 0.3},
            "on": {"isa.probability": 1, "isa.stages": "both", "isa.fda_beta": 0.05}}
    models = {}
    for name, changes in runs.items():
        out = str(tmp_path / name)
        assert cli.main(["run", "--config", "demo", *tiny(str(tmp_path), out, **one_round, **changes)]) == 0
        models[name] = [weights(os.path.join(out, stage, "model.pt"))
                        for stage in ("source", "drsl/round_1", "intrada/inter")]
    for default, off, on in zip(models["default"], models["off"], models["on"]):
        assert default.keys() == off.keys() == on.keys()
        assert all(torch.equal(default[k], off[k]) for k in default)
        assert any(not torch.equal(default[k], on[k]) for k in default)


def test_source_isa_row_is_source_training_with_isa_and_needs_isa(tmp_path):
    """The ablation's 'source + ISA' row trains the source stage again, with
    ISA, beside an untouched source-only model; without ISA it is refused."""
    out = str(tmp_path / "run")
    settings = {"adaptation.rounds": 1, "adaptation.methods": "[source_isa, drsl]", "isa.probability": 1,
                "isa.fda_beta": 0.05}
    assert cli.main(["run", "--config", "demo", *tiny(str(tmp_path), out, **settings)]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    row, = results["methods"]["source + ISA"]
    assert row["round"] is None and row["pseudo_label_accuracy"] is None
    assert "| source + ISA | - |" in open(os.path.join(out, "results.md")).read()
    plain = str(tmp_path / "plain")
    assert cli.main(["run", "--config", "demo", *tiny(str(tmp_path), plain, **dict(settings, **{
        "adaptation.methods": "[drsl]"}))]) == 0
    source, with_isa, reference = (weights(os.path.join(d, "model.pt")) for d in (
        os.path.join(out, "source"), os.path.join(out, "source_isa"), os.path.join(plain, "source")))
    assert all(torch.equal(source[k], reference[k]) for k in source)
    assert any(not torch.equal(source[k], with_isa[k]) for k in source)
    refused = tiny(str(tmp_path), str(tmp_path / "refused"), **dict(settings, **{"isa.probability": 0}))
    assert cli.main(["run", "--config", "demo", *refused]) == 2


def test_pseudo_label_pass_sees_the_target_in_the_source_look(tmp_path):
    """pseudo_labels.isa: each target image translated by FDA towards the
    source image drawn from its name and the seed, the same at every call;
    the label is untouched. Off, the pass reads the target set as it is."""
    data = tmp_path / "data"
    base = pair_on_disk(data, 2, 5, (48, 30), "isa.fda_beta=0.1", "seed=5")
    settings = Settings.of(load_config("demo", base + ["pseudo_labels.isa=true"]))
    targets = target_dataset(settings.data, "train", with_labels=True)
    plain_pass = Settings.of(load_config("demo", base + ["pseudo_labels.isa=false"]))
    assert isa.pseudo_label_images(plain_pass, targets) is targets
    looked = isa.pseudo_label_images(settings, targets)
    sources = source_dataset(settings.data)
    norm = config_normalization(settings.data)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (norm.mean, norm.std))
    for index in range(len(targets)):
        sample, plain = looked[index], targets[index]
        pick = isa.pairing_index(5, plain["name"], len(sources), "source look")
        source = torch.nn.functional.interpolate(sources[pick]["image"][None].double(), size=plain["image"].shape[-2:],
                                                 mode="bilinear", align_corners=False)[0]
        expected = fourier_domain_adaptation((plain["image"].double() * std + mean)[None], (source * std + mean)[None],
                                             0.1)[0]
        assert torch.allclose(sample["image"].double() * std + mean, expected, atol=1e-3)
        assert not torch.allclose(sample["image"], plain["image"], atol=1e-2)
        assert torch.equal(sample["label"], plain["label"]) and torch.equal(looked[index]["image"], sample["image"])
    out = str(tmp_path / "run")
    assert cli.main(["run", "--config", "demo", *tiny(str(tmp_path), out, **{
        "adaptation.rounds": 1, "adaptation.methods": "[drsl]", "pseudo_labels.isa": True})]) == 0
    assert os.path.isfile(os.path.join(out, "drsl", "round_1", "pseudo_labels.json"))
