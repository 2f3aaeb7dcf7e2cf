"""DeepLab-v2 and MMDL-FR head against docs/method.md §2, and init-weight loading."""

import pickle
import warnings

import pytest
import torch

from drsl_fast.models import (
    DeepLabV2,
    FrozenBatchNorm2d,
    InitWeightsWarning,
    MMDLHead,
    SummedDilatedConvs,
    load_init_weights,
)

TINY = dict(depth=18, width=0.125)


def expected_resnet101_deeplab_parameters(num_classes: int, aux: bool) -> int:
    """Counted from the architecture of docs/method.md §2, independently of the code."""
    total = 7 * 7 * 3 * 64 + 2 * 64  # stem conv + BN affine
    in_channels = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 23, 3)):
        for block in range(blocks):
            total += in_channels * planes + 9 * planes * planes + planes * 4 * planes
            total += 2 * (planes + planes + 4 * planes)
            if block == 0:  # projection shortcut (stride, channels or dilation change)
                total += in_channels * 4 * planes + 2 * 4 * planes
            in_channels = 4 * planes
    total += 4 * (9 * 2048 * num_classes + num_classes)
    if aux:
        total += 4 * (9 * 1024 * num_classes + num_classes)
    return total


def test_resnet101_deeplab_v2_parameter_count():
    with torch.device("meta"):
        model = DeepLabV2(19)
        multi_level = DeepLabV2(19, aux_classifier=True)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_resnet101_deeplab_parameters(19, aux=False) == 43_901_068
    # torchvision's ResNet-101 has 44,549,160 parameters, 2,049,000 of them in fc.
    assert count == 44_549_160 - 2_049_000 + 4 * (9 * 2048 * 19 + 19)
    assert sum(p.numel() for p in multi_level.parameters()) == expected_resnet101_deeplab_parameters(19, aux=True)


def test_strides_dilations_and_classifier_follow_spec():
    with torch.device("meta"):
        backbone = DeepLabV2(19, aux_classifier=True).backbone
        model = DeepLabV2(19, aux_classifier=True)
    assert backbone.conv1.kernel_size == (7, 7) and backbone.conv1.stride == (2, 2)
    assert backbone.maxpool.ceil_mode and backbone.maxpool.stride == 2 and backbone.maxpool.kernel_size == 3
    assert [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    assert backbone.layer2[0].conv1.stride == (2, 2) and backbone.layer2[0].conv2.stride == (1, 1)
    for name, dilation in (("layer1", 1), ("layer2", 1), ("layer3", 2), ("layer4", 4)):
        for block in getattr(backbone, name):
            assert block.conv2.dilation == (dilation, dilation) and block.conv2.padding == (dilation, dilation)
            assert block.conv2.stride == (1, 1)
            if name in ("layer3", "layer4"):
                assert block.conv1.stride == (1, 1)
    assert backbone.layer3[0].downsample is not None and backbone.layer4[0].downsample is not None
    for head, channels in ((model.classifier, 2048), (model.aux_classifier, 1024)):
        assert [c.dilation[0] for c in head.conv2d_list] == [6, 12, 18, 24]
        assert all(
            c.padding == c.dilation and c.bias is not None and c.in_channels == channels for c in head.conv2d_list
        )
    assert all(isinstance(m, FrozenBatchNorm2d) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("depth", [18, 50])
def test_output_stride_is_8(depth):
    model = DeepLabV2(5, depth=depth, width=0.125, aux_classifier=True).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 8 * 7 + 1, 8 * 11 + 1))
    assert out.logits.shape == (1, 5, 8, 12)
    assert out.features.shape == (1, model.feature_channels, 8, 12)
    assert out.aux_logits.shape == (1, 5, 8, 12)


def test_classifier_sums_its_four_branches():
    model = DeepLabV2(3, **TINY).eval()
    features = torch.randn(1, model.feature_channels, 6, 7)
    expected = sum(conv(features) for conv in model.classifier.conv2d_list)
    torch.testing.assert_close(model.classifier(features), expected)


def test_frozen_batchnorm_stays_frozen_in_train_mode():
    model = DeepLabV2(4, **TINY)
    bns = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    for bn in bns:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    stats = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    model.train()
    assert model.training and not any(bn.training for bn in bns)
    model(torch.randn(2, 3, 33, 33)).logits.sum().backward()
    for bn, (mean, var) in zip(bns, stats):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        assert not bn.weight.requires_grad and bn.weight.grad is None and bn.bias.grad is None
    # Train and eval mode compute the same function.
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        train_out = model(x).logits
        torch.testing.assert_close(model.eval()(x).logits, train_out)


def test_parameter_groups_put_heads_at_ten_times_lr():
    model = DeepLabV2(4, aux_classifier=True, **TINY)
    head = MMDLHead(model.feature_channels, 4, embedding_dim=8)
    backbone_group, head_group = model.parameter_groups(2.5e-4, extra_heads=[head])
    assert backbone_group["lr"] == 2.5e-4 and head_group["lr"] == pytest.approx(2.5e-3)
    trainable_backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in backbone_group["params"]} == trainable_backbone
    heads = [model.classifier, model.aux_classifier, head]
    assert {id(p) for p in head_group["params"]} == {id(p) for m in heads for p in m.parameters()}
    assert all(p.requires_grad for g in (backbone_group, head_group) for p in g["params"])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = DeepLabV2(3, **TINY)
    checkpointed = DeepLabV2(3, checkpointing=True, **TINY)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 41, 41)
    for model in (plain, checkpointed):
        model(x).logits.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_mmdl_head_shapes_modes_and_distances():
    torch.manual_seed(0)
    head = MMDLHead(in_channels=16, num_classes=5, num_modes=3, embedding_dim=8)
    assert head.R.shape == (15, 8) and head.modes.shape == (5, 3, 8)
    assert head.modes.data_ptr() == head.R.data_ptr()
    assert [c.dilation[0] for c in head.embedding.conv2d_list] == [6, 12, 18, 24]
    features = torch.randn(2, 16, 9, 12)
    emb = head(features)
    assert emb.shape == (2, 8, 36, 48)
    assert head(features, size=(33, 45)).shape == (2, 8, 33, 45)

    out = head.mode_distance(emb)
    pixels = emb.permute(0, 2, 3, 1).reshape(-1, 8).double()
    dist = ((pixels[:, None, None] - head.modes.double()[None]) ** 2).sum(-1)
    dmin = dist.min(-1).values.view(2, 36, 48, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.dmin.double(), dmin, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.posterior.double(), torch.exp(-dmin / (2 * 0.5**2)), rtol=1e-4, atol=1e-5)

    out.dmin.mean().backward()
    assert head.R.grad is not None and head.R.grad.abs().sum() > 0
    assert all(c.weight.grad is not None for c in head.embedding.conv2d_list)


def advent_style_checkpoint(model: DeepLabV2, classes_in_file: int) -> dict:
    """Keys as in DeepLab_resnet_pretrained_imagenet.pth: 'Scale.' prefix,
    classifier as layer5, no num_batches_tracked."""
    state = {}
    for key, value in model.backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            state[f"Scale.{key}"] = torch.randn_like(value)
    channels = model.feature_channels
    for i in range(4):
        state[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.randn(classes_in_file, channels, 3, 3)
        state[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.randn(classes_in_file)
    return state


def test_load_advent_deeplab_init_remaps_and_reports(tmp_path):
    model = DeepLabV2(4, **TINY)
    state = advent_style_checkpoint(model, classes_in_file=21)
    path = tmp_path / "DeepLab_resnet_pretrained_imagenet.pth"
    torch.save(state, path)
    with pytest.warns(InitWeightsWarning, match="shape mismatch"):
        report = load_init_weights(model, str(path))
    torch.testing.assert_close(model.backbone.layer3[1].conv2.weight, state["Scale.layer3.1.conv2.weight"])
    torch.testing.assert_close(model.backbone.bn1.running_var, state["Scale.bn1.running_var"])
    classifier_keys = sorted(k for k in model.state_dict() if k.startswith("classifier."))
    assert sorted(k for k, _, _ in report.shape_mismatch) == classifier_keys
    assert report.shape_mismatch[0][1][0] == 21 and report.shape_mismatch[0][2][0] == 4
    assert report.unexpected == [] and report.missing == []
    assert len(report.loaded) == len(state) - 8


def test_load_exact_deeplab_checkpoint_is_silent(tmp_path):
    model = DeepLabV2(4, **TINY)
    state = advent_style_checkpoint(model, classes_in_file=4)
    torch.save({"state_dict": {k.replace("Scale.", ""): v for k, v in state.items()}}, tmp_path / "init.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_init_weights(model, str(tmp_path / "init.pth"))
    assert report.complete
    torch.testing.assert_close(model.classifier.conv2d_list[2].bias, state["Scale.layer5.conv2d_list.2.bias"])


def test_load_torchvision_resnet_keys_reports_fc_and_classifier(tmp_path):
    model = DeepLabV2(4, **TINY)
    state = {k: torch.randn_like(v.float()) for k, v in model.backbone.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, model.feature_channels), torch.randn(1000)
    torch.save(state, tmp_path / "resnet18.pth")
    with pytest.warns(InitWeightsWarning) as caught:
        report = load_init_weights(model, str(tmp_path / "resnet18.pth"))
    assert "unexpected" in str(caught[0].message) and "missing" in str(caught[0].message)
    assert report.unexpected == ["fc.weight", "fc.bias"]
    assert all(k.startswith("classifier.") for k in report.missing)
    torch.testing.assert_close(model.backbone.layer4[0].downsample[0].weight, state["layer4.0.downsample.0.weight"])


class NotATensor:
    pass


def test_load_refuses_arbitrary_pickled_objects(tmp_path):
    torch.save({"conv1.weight": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        load_init_weights(DeepLabV2(4, **TINY), str(tmp_path / "evil.pth"))


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_init_weights(DeepLabV2(4, **TINY), str(tmp_path / "nothere.pth"))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_head_convs_shared_with_the_classifier_compute_the_same_function(device):
    """DRSLNetwork runs the MMDL-FR embedding block with the classifier, one
    convolution per dilation, or the layer4 head (and the layer3 auxiliary
    classifier) as one matrix product each (DeepLabV2.head_as_gemm), shared
    or apart: logits, embeddings and every
    gradient as when the two run apart as convolutions (float64; on a GPU
    through cuDNN's algorithms for every shape), and the state dict is
    unchanged."""
    from drsl_fast.train.network import DRSLNetwork

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    segmenter = DeepLabV2(5, aux_classifier=True, **TINY).double().to(device)
    head = MMDLHead(segmenter.feature_channels, 5, embedding_dim=8).double().to(device)
    for conv in (*segmenter.classifier.conv2d_list, *segmenter.aux_classifier.conv2d_list,
                 *head.embedding.conv2d_list):
        torch.nn.init.normal_(conv.bias)  # nonzero biases, so their concatenation and sum count
    network = DRSLNetwork(segmenter, head)
    keys = set(network.state_dict())
    images = torch.randn(2, 3, 41, 49, dtype=torch.float64, device=device)
    results = []
    from drsl_fast.models import deeplab, tap_gemm

    filters, aux_filters = [], []  # (output channels, kernel size) of each convolution on layer4, on layer3
    conv2d = deeplab.F.conv2d

    def recording(x, weight, *args):
        dilation = tuple(args[3]) if len(args) > 3 else (1, 1)
        if x.shape[1] == segmenter.feature_channels and (dilation[0] in deeplab.CLASSIFIER_DILATIONS
                                                         or weight.shape[-1] == 1):
            filters.append((weight.shape[0], weight.shape[-1]))  # the classifier's and the embedding block's
        elif x.shape[1] == segmenter.backbone.layer3_channels and weight.shape[0] in (5, 4 * 9 * 5):
            aux_filters.append((weight.shape[0], weight.shape[-1]))  # the auxiliary classifier's (layer3)
        return conv2d(x, weight, *args)

    for shared, gemm in ((False, False), (True, False), (True, True), (False, True)):
        network.shared_convs, segmenter.head_as_gemm = shared, gemm
        network.zero_grad(set_to_none=True)
        filters.clear()
        aux_filters.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(deeplab.F, "conv2d", recording)
            patch.setattr(tap_gemm.F, "conv2d", recording)
            out = network(images, (21, 25))
        taps = 4 * 9  # one block of filters per dilation and tap, in one 1x1 convolution
        expected = {(False, False): [(5, 3)] * 4 + [(8, 3)] * 4, (True, False): [(13, 3)] * 4,
                    (True, True): [(taps * 13, 1)], (False, True): [(taps * 5, 1)] + [(8, 3)] * 4}[shared, gemm]
        assert filters == expected
        assert aux_filters == ([(4 * 9 * 5, 1)] if gemm else [(5, 3)] * 4)
        assert out.embeddings.shape == (2, 8, 21, 25)
        (out.logits.square().mean() + out.aux_logits.square().mean() + out.embeddings.sin().sum()).backward()
        results.append([out.logits, out.aux_logits, out.embeddings]
                       + [p.grad for p in network.parameters() if p.requires_grad])
    tolerance = 1e-12 if device == "cpu" else 1e-10  # cuDNN may sum in another order for each shape
    for apart, *others in zip(*results):
        for tensor in others:
            torch.testing.assert_close(tensor, apart, rtol=tolerance, atol=tolerance)
    assert set(network.state_dict()) == keys
    assert network(images).embeddings is None  # no size asked: the classifier alone


def test_the_config_switches_the_classifiers_to_matrix_products():
    from drsl_fast.train.config import load_config
    from drsl_fast.train.intrada import intrada_network
    from drsl_fast.train.network import build_network
    from drsl_fast.train.settings import Settings

    for value in (False, True):
        settings = Settings.of(load_config("demo", [f"model.head_as_gemm={str(value).lower()}"]))
        assert build_network(settings.model, 5, log=lambda *_: None).segmenter.head_as_gemm is value
        assert intrada_network(settings, log=lambda *_: None).segmenter.head_as_gemm is value


def test_shared_input_convs_refuses_blocks_that_differ():
    from drsl_fast.models.deeplab import shared_input_convs

    x = torch.randn(1, 6, 9, 9)
    odd = SummedDilatedConvs(6, 3)
    odd.conv2d_list[1].padding = (3, 3)
    with pytest.raises(ValueError, match="as_gemm needs 3x3 convolutions with bias, zero padding = dilation"):
        shared_input_convs([odd], x, as_gemm=True)
    for change in ({"dilation": (6, 12), "padding": (6, 12)}, {"padding_mode": "reflect"}, {"bias": None}):
        block = SummedDilatedConvs(6, 3)
        for name, value in change.items():
            setattr(block.conv2d_list[0], name, value)
        with pytest.raises(ValueError, match="as_gemm needs"):
            shared_input_convs([block], x, as_gemm=True)
    with pytest.raises(ValueError, match="differ in shape or dilation"):
        shared_input_convs([SummedDilatedConvs(6, 3), SummedDilatedConvs(6, 2, dilations=(6, 12, 18, 23))], x)
    with pytest.raises(ValueError, match="different numbers of dilations"):
        shared_input_convs([SummedDilatedConvs(6, 3), SummedDilatedConvs(6, 2, dilations=(6, 12))], x)
