"""IntraDA (docs/method.md §7) in the pipeline: the entropy ranking and split
against an independent NumPy implementation on the same predictions, one
adversarial step on tiny models, the pipeline end to end through the CLI,
resume after a crash, and boolean settings."""
import copy
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from drsl_fast import cli
from drsl_fast.data import SyntheticPairConfig, make_synthetic_pair
from drsl_fast.models import DeepLabOutput, DeepLabV2
from drsl_fast.train import loop as loop_module
from drsl_fast.train.adversarial import (AdversarialWeights, Discriminators, adversarial_step,
                                         discriminator_loss, discriminator_optimizer, entropy_maps,
                                         generator_loss)
from drsl_fast.train.config import ConfigError, load_config
from drsl_fast.train.entropy_ranking import rank_target
from drsl_fast.train.log import quiet_log
from drsl_fast.train.network import DRSLNetwork
from drsl_fast.train.runtime import Runtime
from drsl_fast.train.settings import Settings
from test_pipeline_run import TINY_PAIR, tiny

RARE = (3, 4, 5, 6, 7, 9, 12, 14, 15, 16, 17)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions on a shared CPU run fastest on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
FAST = {"intrada.inter_iterations": 4, "intrada.intra_iterations": 4, "intrada.batch_size": 2,
        "intrada.lr": 0.002, "intrada.discriminator_width": 0.125}


# ------------------------------------------------------------------ ranking


class FixedPredictions(nn.Module):
    """A stand-in segmenter: logits of a fixed random 1x1 conv at stride 4."""

    def __init__(self, num_classes=19):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.conv = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 3)
            self.conv.bias.copy_(torch.randn(num_classes, generator=generator) * 2)

    def forward(self, images):
        return DeepLabOutput(self.conv(images[..., ::4, ::4]), None, None)


def independent_ranking(logits, lam, normalize):
    """docs/method.md §7 from the logits (N, C, H, W) in float64 NumPy: scores, rare
    counts, stable ascending order and the easy/hard split."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    C = x.shape[1]
    score = (-p * np.log2(p + 1e-30) / np.log2(C)).mean((1, 2, 3))
    argmax = x.argmax(1)
    rare = np.array([len(set(np.unique(a).tolist()) & set(RARE)) for a in argmax])
    if normalize:
        score = score * ((11 - rare) / 11 + 0.5)
    order = sorted(range(len(score)), key=lambda i: score[i])  # Python's sort is stable: ties keep input order
    n_easy = math.floor(lam * len(score))
    return score, rare, order[:n_easy], order[n_easy:], argmax


@pytest.mark.parametrize("normalize", [False, True])
def test_ranking_and_split_match_an_independent_implementation(tmp_path, normalize):
    root = str(tmp_path / "data")
    make_synthetic_pair(root, SyntheticPairConfig(**dict(TINY_PAIR, n_target_train=9)))
    train = os.path.join(root, "target", "leftImg8bit", "train")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(train) for f in fs)
    shutil.copy(files[1], files[6])  # two images with the same predictions: a tie
    shutil.copy(files[1], files[3])
    config = load_config("demo", tiny(str(tmp_path), str(tmp_path / "run"), **{
        "intrada.normalize": normalize}))
    network = DRSLNetwork(FixedPredictions(), None)
    directory = str(tmp_path / "ranking")
    settings = Settings.of(config)
    summary = rank_target(Runtime(torch.device("cpu")), settings, network, directory, quiet_log())

    from drsl_fast.train.data import target_dataset

    dataset = target_dataset(settings.data, "train", with_labels=False)
    names = [item.name for item in dataset.items]
    logits = []
    for index in range(len(dataset)):
        image = dataset[index]["image"][None]
        with torch.no_grad():  # the same predictions: upsampled to the image size
            logits.append(F.interpolate(network.segmenter(image).logits, size=image.shape[-2:], mode="bilinear",
                                        align_corners=False)[0].numpy())
    score, rare, easy, hard, argmax = independent_ranking(np.stack(logits), 0.67, normalize)
    assert len(easy) == 6 and summary["easy"] == 6 and summary["hard"] == 3
    assert rare.max() > rare.min()  # the normalisation changes something
    easy_names = open(os.path.join(directory, "easy_split.txt")).read().split()
    hard_names = open(os.path.join(directory, "hard_split.txt")).read().split()
    assert easy_names == [names[i] for i in easy] and hard_names == [names[i] for i in hard]
    records = {r["name"]: r for r in json.load(open(os.path.join(directory, "scores.json")))}
    for i, name in enumerate(names):
        assert records[name]["ranked_score"] == pytest.approx(score[i], rel=1e-5)
        assert records[name]["rare_classes"] == rare[i]
        assert records[name]["split"] == ("easy" if i in easy else "hard")
    tie = [names[1], names[3], names[6]]  # equal scores keep the input order
    ranked = easy_names + hard_names
    assert [n for n in ranked if n in tie] == tie
    labels = sorted(os.listdir(os.path.join(directory, "pseudo_labels")))
    assert len(labels) == 6 and sorted(os.listdir(os.path.join(directory, "pseudo_labels_colour"))) == labels
    for i in easy:
        stem = names[i].replace("/", "__")
        plain = np.array(Image.open(os.path.join(directory, "pseudo_labels", stem)))
        colour = Image.open(os.path.join(directory, "pseudo_labels_colour", stem))
        assert plain.dtype == np.uint8 and np.array_equal(plain, argmax[i])
        assert colour.mode == "P" and np.array_equal(np.array(colour), argmax[i])


# ------------------------------------------------------------------ adversarial step


def tiny_models(seed=0):
    torch.manual_seed(seed)
    network = DRSLNetwork(DeepLabV2(19, depth=18, width=0.125, aux_classifier=True), None).train()
    return network, Discriminators(19, ("main", "aux"), width=0.125)


def tiny_batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 19, (2, 32, 32), generator=generator),
            torch.randn(2, 3, 32, 32, generator=generator) + 0.5)


def grads(module):
    return [p.grad for p in module.parameters()]


def test_each_step_reaches_only_its_own_parameters():
    """Generator step: discriminators frozen (no gradient), the network gets
    one; discriminator step: detached inputs, so the network gets none."""
    network, discriminators = tiny_models()
    source, labels, target = tiny_batch()
    for p in discriminators.parameters():
        p.requires_grad_(False)
    loss, source_logits, target_logits, terms = generator_loss(network, discriminators, source, labels, target,
                                                               AdversarialWeights())
    loss.backward()
    assert all(g is None for g in grads(discriminators))
    assert all(p.grad is not None for p in network.parameters() if p.requires_grad)
    assert set(terms) == {"seg_main", "seg_aux", "adv_main", "adv_aux"}
    for p in discriminators.parameters():
        p.requires_grad_(True)
    network.zero_grad(set_to_none=True)
    d_loss, d_terms = discriminator_loss(discriminators, source_logits, target_logits, target.shape[-2:])
    d_loss.backward()
    assert all(p.grad is None for p in network.parameters())
    assert all(g is not None and g.abs().sum() > 0 for g in grads(discriminators))
    assert set(d_terms) == {"d_main", "d_aux"}


def test_losses_follow_spec_labels_and_weights():
    """L_G = seg + 0.1 seg_aux + 0.001 BCE(D(I_t), 0) + 0.0002 BCE(D_aux(I_t), 0);
    L_D = BCE(D(I_s), 0) / 2 + BCE(D(I_t), 1) / 2 per level, with the documented
    entropy map computed here from its formula."""
    network, discriminators = tiny_models()
    source, labels, target = tiny_batch()

    def spec_map(logits):
        logits = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False).double()
        p = logits.softmax(1)
        return (-p * torch.log2(p + 1e-30) / math.log2(19)).float()

    with torch.no_grad():
        loss, source_logits, target_logits, terms = generator_loss(network, discriminators, source, labels, target,
                                                                   AdversarialWeights())
        d_loss, d_terms = discriminator_loss(discriminators, source_logits, target_logits, (32, 32))
        out = network(torch.cat([source, target]))
        expected_total = F.cross_entropy(F.interpolate(out.logits[:2], size=(32, 32), mode="bilinear"), labels)
        expected_total = expected_total + 0.1 * F.cross_entropy(
            F.interpolate(out.aux_logits[:2], size=(32, 32), mode="bilinear"), labels)
        expected_d = 0.0
        for level, logits, weight in (("main", out.logits, 0.001), ("aux", out.aux_logits, 0.0002)):
            d = discriminators.levels[level]
            on_target, on_source = d(spec_map(logits[2:])), d(spec_map(logits[:2]))
            fool = F.binary_cross_entropy_with_logits(on_target, torch.zeros_like(on_target))
            assert terms[f"adv_{level}"] == pytest.approx(float(fool), rel=1e-4)
            expected_total = expected_total + weight * fool
            level_d = (F.binary_cross_entropy_with_logits(on_source, torch.zeros_like(on_source)) / 2
                       + F.binary_cross_entropy_with_logits(on_target, torch.ones_like(on_target)) / 2)
            assert d_terms[f"d_{level}"] == pytest.approx(float(level_d), rel=1e-4)
            expected_d = expected_d + level_d
    assert float(loss) == pytest.approx(float(expected_total), rel=1e-4)
    assert float(d_loss) == pytest.approx(float(expected_d), rel=1e-4)


def test_adversarial_gradient_pushes_target_maps_toward_the_source_label():
    """A small step of the target logits along -grad of the adversarial term
    lowers the discriminator's logit (toward 0 = source); a discriminator
    step separates target maps (label 1) from source maps (label 0) further."""
    _, discriminators = tiny_models()
    d = discriminators.levels["main"]
    generator = torch.Generator().manual_seed(2)
    target_logits = (torch.randn(2, 19, 8, 8, generator=generator) * 2).requires_grad_()
    source_logits = torch.randn(2, 19, 8, 8, generator=generator) * 6
    for p in d.parameters():
        p.requires_grad_(False)
    before = d(entropy_maps(target_logits, (32, 32))).mean()
    fool = F.binary_cross_entropy_with_logits(d(entropy_maps(target_logits, (32, 32))),
                                              torch.zeros(2, 1, 1, 1))
    fool.backward()
    with torch.no_grad():
        after = d(entropy_maps(target_logits - 5.0 * target_logits.grad, (32, 32))).mean()
    assert after < before
    for p in d.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(d.parameters(), lr=0.05)
    sources, targets = {"main": source_logits}, {"main": target_logits.detach()}
    with torch.no_grad():
        start = [d(entropy_maps(x, (32, 32))).mean() for x in (source_logits, targets["main"])]
    loss, _ = discriminator_loss(discriminators, sources, targets, (32, 32))
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        end = [d(entropy_maps(x, (32, 32))).mean() for x in (source_logits, targets["main"])]
    assert end[1] - end[0] > start[1] - start[0]  # target (label 1) above source (label 0), more than before
    assert float(discriminator_loss(discriminators, sources, targets, (32, 32))[0]) < float(loss)


def test_full_step_is_sgd_on_the_generator_loss_and_adam_on_the_discriminator_loss():
    """adversarial_step = SGD step of the network on dL_G (discriminators
    frozen) and an Adam step (lr 1e-4, betas (0.9, 0.99)) of the
    discriminators on dL_D, computed here separately on copies."""
    network, discriminators = tiny_models()
    source, labels, target = tiny_batch()
    weights = AdversarialWeights()
    ref_network, ref_discriminators = copy.deepcopy(network), copy.deepcopy(discriminators)

    g_opt = torch.optim.SGD(network.parameter_groups(0.01), lr=0.01, momentum=0.9, weight_decay=5e-4)
    d_opt = discriminator_optimizer(discriminators)
    assert d_opt.defaults["lr"] == 1e-4 and d_opt.defaults["betas"] == (0.9, 0.99)
    adversarial_step(network, discriminators, g_opt, d_opt, source, labels, target, weights)

    frozen = copy.deepcopy(ref_discriminators).requires_grad_(False)
    loss, source_logits, target_logits, _ = generator_loss(ref_network, frozen, source, labels, target, weights)
    loss.backward()
    d_loss, _ = discriminator_loss(ref_discriminators, source_logits, target_logits, target.shape[-2:])
    d_loss.backward()
    torch.optim.SGD(ref_network.parameter_groups(0.01), lr=0.01, momentum=0.9, weight_decay=5e-4).step()
    torch.optim.Adam(ref_discriminators.parameters(), lr=1e-4, betas=(0.9, 0.99)).step()
    for a, b in zip(network.parameters(), ref_network.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(discriminators.parameters(), ref_discriminators.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(p.requires_grad for p in discriminators.parameters())  # unfrozen after the step
    assert any(not torch.equal(a, b) for a, b in zip(discriminators.parameters(), frozen.parameters()))


# ------------------------------------------------------------------ pipeline


def test_intrada_subcommand_end_to_end(tmp_path):
    """`drsl intrada` on the tiny synthetic pair: source model, inter-domain
    stage, ranking (split files, pseudo-labels), intra-domain stage, results
    with the snapshot choice stated; DRSL rows stay beside it."""
    out = str(tmp_path / "run")
    settings = dict(FAST, **{"intrada.select_snapshot": "best_on_train", "intrada.snapshot_every": 2,
                             "adaptation.methods": "[drsl]", "adaptation.rounds": 1})
    assert cli.main(["run", "--config", "demo", *tiny(str(tmp_path), out, **settings)]) == 0
    assert cli.main(["intrada", "--config", "demo", *tiny(str(tmp_path), out, **settings)]) == 0
    ranking = os.path.join(out, "intrada", "ranking")
    easy = open(os.path.join(ranking, "easy_split.txt")).read().split()
    hard = open(os.path.join(ranking, "hard_split.txt")).read().split()
    assert len(easy) == 4 and len(hard) == 2  # floor(0.67 * 6)
    assert len(os.listdir(os.path.join(ranking, "pseudo_labels"))) == 4
    assert len(os.listdir(os.path.join(ranking, "pseudo_labels_colour"))) == 4
    results = json.load(open(os.path.join(out, "results.json")))
    assert list(results["methods"]) == ["DRSL", "IntraDA"]
    inter, intra = results["methods"]["IntraDA"]
    assert (inter["stage"], intra["stage"]) == ("inter", "intra")
    assert inter["selected_on"] == intra["selected_on"] == "train" and intra["snapshot"] in (2, 4)
    assert 0 <= intra["miou"] <= 100 and intra["pseudo_label_coverage"] == pytest.approx(100 * 4 / 6)
    selection = json.load(open(os.path.join(out, "intrada", "intra", "selection.json")))
    assert set(selection["miou_by_iteration"]) == {"2", "4"}
    table = open(os.path.join(out, "results.md")).read()
    assert "| IntraDA | 2 intra, best on train @" in table and "| DRSL | 1 |" in table
    for stage in ("inter", "intra"):
        assert os.path.isfile(os.path.join(out, "intrada", stage, "model.pt"))
        assert not os.path.exists(os.path.join(out, "intrada", stage, "checkpoint.pt"))


class Crash(Exception):
    pass


def test_resume_after_a_crash_mid_stage_gives_the_same_result(tmp_path, monkeypatch):
    """A run that dies right after a checkpoint of the intra-domain stage and
    is resumed ends with the weights and numbers of an uninterrupted run."""
    settings = dict(FAST, **{"intrada.intra_iterations": 6, "train.checkpoint_every": 2,
                             "adaptation.methods": "[intrada]"})
    whole, crashed = str(tmp_path / "whole"), str(tmp_path / "crashed")
    assert cli.main(["run", "--config", "demo", *tiny(str(tmp_path), whole, **settings)]) == 0

    save = loop_module.save_training_state

    def save_then_crash(path, **kwargs):
        save(path, **kwargs)
        if kwargs["position"]["stage"] == "intrada/intra" and kwargs["position"]["iteration"] == 4:
            raise Crash

    monkeypatch.setattr(loop_module, "save_training_state", save_then_crash)
    with pytest.raises(Crash):
        cli.main(["run", "--config", "demo", *tiny(str(tmp_path), crashed, **settings)])
    monkeypatch.setattr(loop_module, "save_training_state", save)
    assert not os.path.exists(os.path.join(crashed, "intrada", "intra", "model.pt"))
    assert cli.main(["run", "--resume", "--config", "demo", *tiny(str(tmp_path), crashed, **settings)]) == 0
    for name in ("inter/model.pt", "inter/discriminators.pt", "intra/model.pt", "intra/discriminators.pt"):
        a, b = (torch.load(os.path.join(d, "intrada", name), weights_only=True)["model"] for d in (whole, crashed))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (json.load(open(os.path.join(d, "results.json"))) for d in (whole, crashed))
    assert a == b


# ------------------------------------------------------------------ configuration


def test_booleans_parse_as_booleans_and_configs_carry_spec_settings():
    """docs/method.md §7: the original CLI read `--normalize False` as True; here
    false/False are False and anything but a boolean is refused."""
    for text in ("false", "False"):
        assert load_config("demo", [f"intrada.normalize={text}"])["intrada"]["normalize"] is False
    assert load_config("demo", ["intrada.normalize=true"])["intrada"]["normalize"] is True
    with pytest.raises(ConfigError, match="intrada.normalize: expected true or false"):
        load_config("demo", ["intrada.normalize=maybe"])
    with pytest.raises(ConfigError, match="intrada.select_snapshot: expected one of"):
        load_config("demo", ["intrada.select_snapshot=best"])
    with pytest.raises(ConfigError, match="unknown key 'intrada.lamda'"):
        load_config("demo", ["intrada.lamda=0.5"])
    gta5 = load_config("gta5_intrada")["intrada"]
    assert gta5["lambda"] == 0.67 and gta5["normalize"] is False and gta5["aux_classifier"] is True
    assert (gta5["adv_main"], gta5["adv_aux"], gta5["seg_aux"]) == (0.001, 0.0002, 0.1)
    assert gta5["discriminator_lr"] == 1e-4 and gta5["discriminator_betas"] == [0.9, 0.99]
    assert gta5["lr"] == 2.5e-4 and load_config("gta5_intrada")["adaptation"]["methods"] == ["intrada"]


def test_two_process_ddp_ranks_like_one_process(tmp_path):
    """torchrun, gloo, 2 CPU processes: the adversarial stages train data-
    parallel and the all-reduced scores give the ranking of one process."""
    import subprocess
    import sys

    settings = dict(FAST, **{"adaptation.methods": "[intrada]", "data.synthetic": json.dumps(
        dict(TINY_PAIR, n_target_train=7))})
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    assert cli.main(["source", "--config", "demo", *tiny(str(tmp_path), single, **settings)]) == 0
    os.makedirs(ddp)
    shutil.copytree(os.path.join(single, "source"), os.path.join(ddp, "source"))
    # the inter-domain model is the same input for both rankings
    assert cli.main(["intrada", "--config", "demo", *tiny(str(tmp_path), single, **settings)]) == 0
    shutil.copytree(os.path.join(single, "intrada", "inter"), os.path.join(ddp, "intrada", "inter"))
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "drsl_fast.cli", "intrada", "--config", "demo", *tiny(str(tmp_path), ddp, **settings)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    for name in ("easy_split.txt", "hard_split.txt"):
        a, b = (open(os.path.join(d, "intrada", "ranking", name)).read() for d in (single, ddp))
        assert a == b and a.strip()
    a, b = (json.load(open(os.path.join(d, "intrada", "ranking", "scores.json"))) for d in (single, ddp))
    assert len(a) == len(b) == 7
    for x, y in zip(a, b):  # per image: name, split, rare count equal; scores equal up to summation order
        assert {k: v for k, v in x.items() if not isinstance(v, float)} == \
            {k: v for k, v in y.items() if not isinstance(v, float)}
        assert all(x[k] == pytest.approx(y[k], rel=1e-5) for k in x if isinstance(x[k], float))
    assert os.path.isfile(os.path.join(ddp, "intrada", "intra", "model.pt"))
