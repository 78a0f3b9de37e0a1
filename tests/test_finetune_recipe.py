"""The fine-tuning recipe against SparK's downstream_imagenet, restated here independently of sparkme.finetune.

SparK's rules (arg.py HP_DEFAULT_VALUES, models/__init__.py layer ids, lr_decay.py schedule and groups, util.py
optimizer / mixup / loss, data.py transforms) are written out below in SparK's own terms (official ConvNeXt names,
SparK's formulas) and compared with what sparkme builds from timm models.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.models.resnet import BasicBlock, ResNet
from timm.optim import Lamb
from torchvision import transforms as T

from sparkme.errors import UsageError
from sparkme.finetune.layer_decay import layer_structure, num_layers, param_groups
from sparkme.finetune.mixing import build_eval_loss, build_loss, build_mixup
from sparkme.finetune.optimizer import build_optimizer
from sparkme.finetune.recipes import FinetuneRecipe, recipe_for
from sparkme.finetune.schedule import FinetuneSchedule
from sparkme.finetune.transforms import eval_transform, train_transform

# SparK arg.py: bs, ep, wp_ep, opt, base_lr, lr_scale, wd, mixup, rep_aug, drop_path, ema.
SPARK_HP = {
    "convnext_small": (4096, 400, 20, "adam", 0.0002, 0.7, 0.01, 0.8, 3, 0.3, 0.9999),
    "convnext_base": (4096, 400, 20, "adam", 0.0001, 0.7, 0.01, 0.8, 3, 0.4, 0.9999),
    "convnext_large": (4096, 200, 10, "adam", 0.0001, 0.7, 0.02, 0.8, 3, 0.5, 0.9999),
    "resnet50": (2048, 300, 5, "lamb", 0.002, 0.7, 0.02, 0.1, 0, 0.05, 0.9999),
    "resnet101": (2048, 300, 5, "lamb", 0.001, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    "resnet152": (2048, 300, 5, "lamb", 0.001, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    "resnet200": (2048, 300, 5, "lamb", 0.001, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
}
SPARK_N = {"resnet50": 6, "resnet101": 12, "resnet152": 13, "resnet200": 17,
           "convnext_small": 12, "convnext_base": 12, "convnext_large": 12}


@functools.cache
def meta_model(name: str) -> torch.nn.Module:
    """A timm model on the meta device (no memory, no init time), built once per name; tests must not modify it."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


# --- SparK's layer ids, restated --------------------------------------------------------------------------------

def spark_resnet_layer(name: str, l2: int, l3: int) -> tuple[int, int]:
    """(layer id, N) of SparK's resnets_get_layer_id_and_scale_exp."""
    blk2, blk3 = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4)}[(l2, l3)]
    n2, n3 = -(-l2 // blk2), -(-l3 // blk3)
    n = 2 + n2 + n3
    if name.startswith("layer"):
        stage, block = int(name[5]), int(name.split(".")[1])
        layer = {1: 1, 2: 2 + block // blk2, 3: 2 + n2 + block // blk3}.get(stage, n)
    elif name.startswith("fc."):
        layer = n + 1
    else:
        layer = 0
    return layer, n


def official_convnext_name(timm_name: str) -> str:
    """timm ConvNeXt key -> facebookresearch ConvNeXt key (the names SparK's rule reads)."""
    name = timm_name.replace("stem.", "downsample_layers.0.", 1)
    for i in range(1, 4):
        name = name.replace(f"stages.{i}.downsample.", f"downsample_layers.{i}.")
    for i in range(4):
        name = name.replace(f"stages.{i}.blocks.", f"stages.{i}.")
    return name.replace("head.norm.", "norm.").replace("head.fc.", "head.")


def spark_convnext_layer(official: str, stage2_depth: int) -> tuple[int, int]:
    """(layer id, N) of SparK's convnext_get_layer_id_and_scale_exp."""
    n = 12 if stage2_depth > 9 else 6
    parts = official.split(".")
    if parts[0] == "downsample_layers":
        s = int(parts[1])
        layer = 0 if s == 0 else (s + 1 if s in (1, 2) else n)
    elif parts[0] == "stages":
        s, b = int(parts[1]), int(parts[2])
        layer = s + 1 if s in (0, 1) else (3 + b // 3 if s == 2 else n)
    else:
        layer = n + 1
    return layer, n


def spark_factor_and_wd(name: str, param: torch.Tensor, model: torch.nn.Module, model_name: str):
    """(lr factor, weight decay) SparK gives a parameter: lr_scale ** (N + 1 - layer), wd unless no-decay."""
    _, _, _, _, _, decay, wd, *_ = SPARK_HP[model_name]
    if model_name.startswith("resnet"):
        layer, n = spark_resnet_layer(name, len(model.layer2), len(model.layer3))
    else:
        layer, n = spark_convnext_layer(official_convnext_name(name), len(model.stages[2].blocks))
    nowd = len(param.shape) == 1 or name.endswith(".bias") or any(
        k in name for k in ("cls_token", "pos_embed", "mask_token", "gamma"))
    return decay ** (n + 1 - layer), 0.0 if nowd else wd, n


@pytest.mark.parametrize("model_name", list(SPARK_HP))
def test_every_parameter_gets_sparks_lr_factor_and_weight_decay(model_name):
    model = meta_model(model_name)
    recipe = recipe_for(model_name)
    assert num_layers(layer_structure(model, model_name)) == SPARK_N[model_name]
    optimizer = build_optimizer(model, model_name, recipe, lr=1.0)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    for name, param in model.named_parameters():
        factor, wd, n = spark_factor_and_wd(name, param, model, model_name)
        assert n == SPARK_N[model_name]
        group = group_of[id(param)]
        assert group["lr_scale"] == pytest.approx(factor, rel=1e-12), name
        assert group["lr"] == pytest.approx(factor, rel=1e-12), name
        assert group["weight_decay"] == wd, name


SPOT_CHECKS = {  # (model, name) -> layer id, from SparK's comments and rule worked by hand
    ("resnet50", "conv1.weight"): 0, ("resnet50", "layer1.2.conv3.weight"): 1, ("resnet50", "layer2.1.bn1.weight"): 2,
    ("resnet50", "layer2.2.conv1.weight"): 3, ("resnet50", "layer3.2.conv1.weight"): 4,
    ("resnet50", "layer3.3.conv1.weight"): 5, ("resnet50", "layer4.0.downsample.0.weight"): 6,
    ("resnet50", "fc.weight"): 7,
    ("resnet101", "layer3.22.conv1.weight"): 11, ("resnet101", "layer4.2.conv3.weight"): 12,
    ("resnet101", "fc.bias"): 13,
    ("resnet152", "layer2.7.conv1.weight"): 3, ("resnet152", "layer3.35.conv1.weight"): 12,
    ("resnet152", "fc.weight"): 14,
    ("resnet200", "layer2.23.conv1.weight"): 7, ("resnet200", "layer3.0.conv1.weight"): 8,
    ("resnet200", "layer4.0.conv1.weight"): 17, ("resnet200", "fc.weight"): 18,
    ("convnext_small", "stem.0.weight"): 0, ("convnext_small", "stages.0.blocks.2.gamma"): 1,
    ("convnext_small", "stages.1.downsample.1.weight"): 2, ("convnext_small", "stages.2.downsample.1.weight"): 3,
    ("convnext_small", "stages.2.blocks.2.conv_dw.weight"): 3, ("convnext_small", "stages.2.blocks.26.gamma"): 11,
    ("convnext_small", "stages.3.downsample.0.weight"): 12, ("convnext_small", "stages.3.blocks.0.mlp.fc1.weight"): 12,
    ("convnext_small", "head.norm.weight"): 13, ("convnext_small", "head.fc.weight"): 13,
}


@pytest.mark.parametrize("model_name,n", [("convnext_tiny", 6), ("convnext_atto", 6), ("convnext_xlarge", 12)])
def test_convnext_rule_on_sizes_without_a_preset(model_name, n):
    """Stage 2 of 9 blocks (ConvNeXt-T) is N = 6: SparK's test is "more than 9"."""
    model = meta_model(model_name)
    structure = layer_structure(model, model_name)
    assert num_layers(structure) == n
    groups = param_groups(model, model_name, weight_decay=0.05, layer_decay=0.7)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        layer, spark_n = spark_convnext_layer(official_convnext_name(name), len(model.stages[2].blocks))
        assert spark_n == n and scale_of[id(param)] == pytest.approx(0.7 ** (n + 1 - layer)), name


def test_layer_id_spot_checks():
    decay = {name: SPARK_HP[name][5] for name in SPARK_HP}
    n = SPARK_N
    for model_name in {m for m, _ in SPOT_CHECKS}:
        model = meta_model(model_name)
        groups = param_groups(model, model_name, weight_decay=0.05, layer_decay=decay[model_name])
        scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        params = dict(model.named_parameters())
        for (m, name), layer in SPOT_CHECKS.items():
            if m == model_name:
                expected = decay[m] ** (n[m] + 1 - layer)
                assert scale_of[id(params[name])] == pytest.approx(expected), (m, name)


def test_no_decay_for_gamma_bias_and_1d_and_layer_decay_off_outside_0_1():
    model = meta_model("convnext_atto")
    groups = param_groups(model, "convnext_atto", weight_decay=0.05, layer_decay=1.0)
    params = dict(model.named_parameters())
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd_of[id(params["stages.0.blocks.0.gamma"])] == 0.0
    assert wd_of[id(params["stem.0.bias"])] == 0.0
    assert wd_of[id(params["stem.0.weight"])] == 0.05
    assert {g["lr_scale"] for g in groups} == {1.0}
    # decay 0 is "off" in SparK (0 < lr_scale < 1), not "freeze everything but the head".
    assert {g["lr_scale"] for g in param_groups(model, "convnext_atto", 0.05, 0.0)} == {1.0}


def test_frozen_parameters_are_left_out():
    with torch.device("meta"):
        model = timm.create_model("resnet18")
    model.conv1.weight.requires_grad_(False)
    groups = param_groups(model, "resnet18", 0.02, 0.7)
    assert all(p is not model.conv1.weight for g in groups for p in g["params"])


@pytest.mark.parametrize("build", [
    lambda: meta_model("efficientnet_b0"), lambda: meta_model("regnety_016"),
    lambda: meta_model("mobilenetv3_large_100"), lambda: meta_model("densenet121"),
    lambda: meta_model("cspresnet50"), lambda: meta_model("convnextv2_atto"), lambda: meta_model("resnet18"),
    lambda: meta_model("seresnext50_32x4d"),
])
def test_other_families_stem_lowest_head_full_lr(build):
    model = build()
    structure = layer_structure(model)
    n = num_layers(structure)
    groups = param_groups(model, "", weight_decay=0.02, layer_decay=0.7)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scale_of) == len(list(model.parameters()))
    first = next(iter(model.parameters()))
    assert scale_of[id(first)] == pytest.approx(0.7 ** (n + 1))
    for p in model.get_classifier().parameters():
        assert scale_of[id(p)] == 1.0
    assert 4 <= n <= 8


def test_torchvision_resnet_numbered_as_timm():
    with torch.device("meta"):
        tv, tm = torchvision.models.resnet101(), timm.create_model("resnet101")
    a = [g["lr_scale"] for g in param_groups(tv, "resnet101", 0.02, 0.8)]
    b = [g["lr_scale"] for g in param_groups(tm, "resnet101", 0.02, 0.8)]
    assert a == b and num_layers(layer_structure(tv)) == 12


def test_unknown_model_has_no_layer_numbering():
    with pytest.raises(UsageError):
        layer_structure(torch.nn.Linear(2, 2), "linear")


# --- recipes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", list(SPARK_HP))
def test_presets_are_sparks_table(model_name):
    bs, ep, wp, opt, blr, decay, wd, mixup, rep_aug, drop_path, ema = SPARK_HP[model_name]
    r = recipe_for(model_name)
    assert (r.global_batch, r.epochs, r.warmup_epochs, r.base_lr, r.layer_decay, r.weight_decay, r.mixup,
            r.drop_path, r.ema_decay) == (bs, ep, wp, blr, decay, wd, mixup, drop_path, ema)
    assert r.optimizer == {"adam": "adamw", "lamb": "lamb"}[opt]
    assert r.repeated_aug == max(1, rep_aug)
    assert r.loss == ("bce" if opt == "lamb" else "soft_ce")  # util.py: BCE iff 'lamb' in args.opt
    assert (r.cutmix, r.mix_switch_prob, r.label_smoothing, r.image_size) == (1.0, 0.5, 0.1, 224)
    assert r.peak_lr() == pytest.approx(blr * bs / 256) and r.peak_lr(256) == pytest.approx(blr)


def test_convnext_large_at_384_uses_sparks_384_row():
    r = recipe_for("convnext_large", image_size=384)
    assert (r.global_batch, r.epochs, r.warmup_epochs, r.base_lr, r.weight_decay, r.ema_decay, r.image_size) == (
        1024, 200, 20, 0.00006, 0.01, 0.99995, 384)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50d", "resnext50_32x4d", "seresnext50_32x4d",
                                  "ecaresnet50d", "wide_resnet50_2", "ecaresnet269d", "regnety_016",
                                  "efficientnet_b0", "mobilenetv3_large_100", "densenet121", "cspresnet50",
                                  "convnext_atto", "convnext_tiny", "convnextv2_atto", "convnextv2_huge"])
def test_other_families_have_a_recipe(name):
    r = recipe_for(name)
    assert isinstance(r, FinetuneRecipe) and r.origin == "sparkme"
    assert (r.optimizer, r.loss) in {("lamb", "bce"), ("adamw", "soft_ce")}
    assert r.optimizer == ("adamw" if name.startswith("convnext") else "lamb")


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "convnext_gigantic", "swin_tiny"])
def test_unknown_model_is_a_usage_error(name):
    with pytest.raises(UsageError):
        recipe_for(name)


# --- optimizer ---------------------------------------------------------------------------------------------------

def test_lamb_and_adamw_as_spark_sets_them():
    lamb = build_optimizer(meta_model("resnet50"), "resnet50", recipe_for("resnet50"), lr=0.016)
    assert isinstance(lamb, Lamb)
    assert (lamb.defaults["bias_correction"], lamb.defaults["always_adapt"], lamb.defaults["max_grad_norm"]) == (
        False, True, None)
    assert (lamb.defaults["betas"], lamb.defaults["eps"], lamb.defaults["trust_clip"]) == ((0.9, 0.999), 1e-6, False)
    assert not lamb.defaults["decoupled_decay"] and lamb.defaults["grad_averaging"]
    adamw = build_optimizer(meta_model("convnext_small"), "convnext_small", recipe_for("convnext_small"), lr=0.0032)
    assert type(adamw) is torch.optim.AdamW
    assert (adamw.defaults["betas"], adamw.defaults["eps"], adamw.defaults["amsgrad"]) == ((0.9, 0.999), 1e-8, False)
    assert max(g["lr"] for g in adamw.param_groups) == pytest.approx(0.0032)


def test_lamb_steps_on_a_real_model():
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, stem_width=8, channels=(8, 16, 32, 64))  # a tiny ResNet
    optimizer = build_optimizer(model, "resnet18", recipe_for("resnet18"), lr=1e-3)
    before = model.fc.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.fc.weight)


# --- schedule ----------------------------------------------------------------------------------------------------

def spark_annealed_lr(peak_lr, cur_it, wp_it, max_it):
    """SparK lr_decay.py lr_wd_annealing's lr."""
    wp_it = round(wp_it)
    if cur_it < wp_it:
        return 0.005 * peak_lr + 0.995 * peak_lr * cur_it / wp_it
    ratio = (cur_it - wp_it) / (max_it - 1 - wp_it)
    return 0.001 * peak_lr + 0.999 * peak_lr * (0.5 + 0.5 * math.cos(math.pi * ratio))


@pytest.mark.parametrize("model_name,iters_per_epoch", [("resnet50", 7), ("convnext_large", 3)])
def test_lr_every_iteration_is_sparks(model_name, iters_per_epoch):
    recipe = recipe_for(model_name)
    peak = recipe.peak_lr()
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr_scale": 0.3}, {"params": [params[1]], "lr_scale": 1.0}],
                                lr=123.0)
    wp_it, max_it = recipe.warmup_epochs * iters_per_epoch, recipe.epochs * iters_per_epoch
    schedule = FinetuneSchedule(optimizer, peak, wp_it, max_it)
    for it in range(max_it):
        expected = spark_annealed_lr(peak, it, wp_it, max_it)
        assert schedule.step(it) == pytest.approx(expected, rel=1e-12, abs=0)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * expected, rel=1e-12, abs=0)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(expected, rel=1e-12, abs=0)
    same = FinetuneSchedule.for_recipe(optimizer, recipe, iters_per_epoch, recipe.global_batch)
    assert (same.peak_lr, same.warmup_iters, same.total_iters) == (peak, wp_it, max_it)
    assert schedule.step(0) == pytest.approx(0.005 * peak)
    assert schedule.step(wp_it) == pytest.approx(peak)
    assert schedule.step(max_it - 1) == pytest.approx(0.001 * peak)


# --- mixup and losses --------------------------------------------------------------------------------------------

def smoothed_one_hot(labels, num_classes, smoothing=0.1):
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off).scatter_(1, labels[:, None], 1 - smoothing + off)


@pytest.mark.parametrize("batch", [5, 6])
def test_mixup_odd_batch_duplicates_sample_zero(batch):
    num_classes = 8
    mixer = build_mixup(recipe_for("resnet50"), num_classes)
    seen = set()
    for seed in range(12):
        np.random.seed(seed)
        images, labels = torch.randn(batch, 3, 8, 8), torch.arange(batch)
        ext = torch.cat((images[:1], images)) if batch % 2 else images.clone()
        ext_labels = torch.cat((labels[:1], labels)) if batch % 2 else labels
        out, targets, out_labels = mixer(images.clone(), labels)
        assert out.shape[0] == targets.shape[0] == out_labels.shape[0] == batch + batch % 2
        assert torch.equal(out_labels, ext_labels)
        assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
        y1, y2 = smoothed_one_hot(ext_labels, num_classes), smoothed_one_hot(ext_labels.flip(0), num_classes)
        # lam from row 0 (its label differs from the flipped one), then the whole target matrix must fit it.
        off, on = 0.1 / num_classes, 0.9 + 0.1 / num_classes
        lam = (targets[0, ext_labels[0]].item() - off) / (on - off)
        assert torch.allclose(targets, lam * y1 + (1 - lam) * y2, atol=1e-6)
        if torch.allclose(out, lam * ext + (1 - lam) * ext.flip(0), atol=1e-4):
            seen.add("mixup")
        else:
            from_flip = (out == ext.flip(0)) & (out != ext)
            assert ((out == ext) | (out == ext.flip(0))).all()
            assert from_flip[0, 0].float().mean().item() == pytest.approx(1 - lam, abs=1e-5)
            seen.add("cutmix")
    assert seen == {"mixup", "cutmix"}


def test_mixup_off_still_smooths_labels():
    recipe = FinetuneRecipe(64, 1, 0, "adamw", 1e-4, 0.7, 0.05, 0.0, 1, 0.0, "soft_ce", (0.9, 0.999), 1e-8)
    images, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    out, targets, _ = build_mixup(recipe, 3)(images.clone(), labels)
    ext = torch.cat((images[:1], images))
    assert torch.equal(out, ext)
    assert torch.allclose(targets, smoothed_one_hot(torch.cat((labels[:1], labels)), 3))


def test_losses():
    logits, targets = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), 1)
    bce = build_loss(recipe_for("resnet50"))
    assert isinstance(bce, BinaryCrossEntropy)
    assert torch.allclose(bce(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))
    labels = torch.tensor([0, 1, 2, 3])
    # SparK: BinaryCrossEntropy(smoothing=0): hard labels are not smoothed a second time.
    assert torch.allclose(bce(logits, labels), F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, 5).float()))
    soft = build_loss(recipe_for("convnext_base"))
    assert isinstance(soft, SoftTargetCrossEntropy)
    assert torch.allclose(soft(logits, targets), (-targets * logits.log_softmax(1)).sum(1).mean())
    assert torch.allclose(build_eval_loss()(logits, labels), F.cross_entropy(logits, labels))


# --- transforms --------------------------------------------------------------------------------------------------

def test_train_transform_trivial_augment_below_384_and_erasing():
    from timm.data.auto_augment import AutoAugment
    from timm.data.random_erasing import RandomErasing

    small, large = train_transform(224).transforms, train_transform(384).transforms
    trivial = [t for t in small if isinstance(t, T.TrivialAugmentWide)]
    assert len(trivial) == 1 and trivial[0].interpolation == T.InterpolationMode.BICUBIC
    assert not any(isinstance(t, (AutoAugment, T.ColorJitter)) for t in small)
    assert any(isinstance(t, AutoAugment) for t in large) and not any(isinstance(t, T.ColorJitter) for t in large)
    erasing = [t for t in small if isinstance(t, RandomErasing)][0]
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8))
    assert train_transform(224)(image).shape == (3, 224, 224)
    assert train_transform(384)(image).shape == (3, 384, 384)


def test_eval_transform_crop_below_384_squash_at_384():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 410, 3), dtype=np.uint8))
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    bicubic = T.InterpolationMode.BICUBIC
    crop = T.Compose([T.Resize(235, interpolation=bicubic), T.CenterCrop(224), T.ToTensor(), norm])  # 224 / 0.95
    squash = T.Compose([T.Resize((384, 384), interpolation=bicubic), T.ToTensor(), norm])
    assert torch.equal(eval_transform(224)(image), crop(image))
    assert torch.equal(eval_transform(384)(image), squash(image))
