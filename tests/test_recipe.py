"""train_imagenet.py as shipped: the default augmentation over many images and short runs with the default recipe.

Every recipe flag keeps its default here (RandAugment ``rand-m9-mstd0.5-inc1``, random erasing, Mixup/CutMix,
label smoothing, EMA, lr scaling, warmup and cosine schedule); only the data, model size, batch, epochs and
workers are made small.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import AugmentOp
from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

from mrconvnext import train_imagenet
from mrconvnext.data.transforms import posterize
from mrconvnext.demo import make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]


def _augment_ops(transform) -> list[AugmentOp]:
    return [op for t in transform.transforms for op in getattr(t, "ops", []) if isinstance(op, AugmentOp)]


def test_posterize_matches_bit_mask_reference() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for bits in range(9):
        mask = (0xFF << (8 - bits)) & 0xFF  # keep the `bits` most significant bits; 0 bits: all cleared
        expected = pixels & np.uint8(mask)
        np.testing.assert_array_equal(np.asarray(posterize(image, bits)), expected, err_msg=f"{bits} bits")


def test_default_train_transform_runs_over_many_images() -> None:
    """Default RandAugment draws 0 posterize bits about once in 650 images: Pillow >= 13 rejects that."""
    args = train_imagenet.create_parser().parse_args(["--data-dir", "unused", "--img-size", "32"])
    data_config = {"input_size": (3, 32, 32), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    transform = train_imagenet.create_train_transform(args, data_config)
    posterize_ops = [op for op in _augment_ops(transform) if op.name.startswith("Posterize")]
    assert posterize_ops, f"default --aa {args.aa!r} has no posterize op: {transform}"
    bits_drawn = []
    for op in posterize_ops:  # record the bits each applied posterize asks for
        level_fn = op.level_fn
        op.level_fn = lambda *a, _fn=level_fn: bits_drawn.append(_fn(*a)[0]) or (bits_drawn[-1],)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(8)]
    random.seed(0)
    torch.manual_seed(0)
    for index in range(4000):
        out = transform(images[index % len(images)])
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    assert 0 in bits_drawn, "the seeded draws no longer reach 0 bits: raise the image count"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # 2 classes, 16 train images: 2 updates per epoch at -b 8
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 8, 3, size=32, classes=("circle", "square"), seed=2)


def _train(data_dir: Path, out: Path, *args: str) -> str:
    cmd = [sys.executable, str(ROOT / "train_imagenet.py"), "--data-dir", str(data_dir), "--num-classes", "2"]
    cmd += ["--img-size", "32", "-b", "8", "--epochs", "2", "--workers", "0", "--output", str(out)]
    cmd += ["--experiment", "run", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.mark.parametrize("model", ["mrconvnext_atto", "resnet18"])
def test_default_recipe_trains(model, data_dir, tmp_path) -> None:
    log = _train(data_dir, tmp_path / "out", "--model", model)
    run_dir = tmp_path / "out" / "run"
    config = yaml.safe_load((run_dir / "args.yaml").read_text())
    defaults = vars(train_imagenet.create_parser().parse_args(["--data-dir", "x"]))
    for key in ("aa", "reprob", "mixup", "cutmix", "smoothing", "model_ema", "model_ema_decay", "sched"):
        assert config[key] == defaults[key], key
    assert config["aa"] == "rand-m9-mstd0.5-inc1" and config["mixup"] > 0 and config["smoothing"] > 0
    assert config["model_ema"] is True and config["model_ema_decay"] == 0.9999  # ConvNeXt's T/S/B commands
    checkpoint = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and "state_dict_ema" in checkpoint
    assert "EMA top-1" in log
    # a 4-update run at global batch 8: the lr scaled to 4e-3 * 8 / 4096, a warmup that never ends and an EMA
    # that cannot move are all said in the output
    assert "lr 7.813e-06 = --lr-base 0.004 x global batch 8 / --lr-base-size 4096 (linear)" in log, log
    assert "warning: --warmup-epochs 20 >= --epochs 2" in log, log
    assert "warning: --model-ema-decay 0.9999 averages over about 10000 updates but the run has 4" in log, log


def _model(*args: str) -> torch.nn.Module:
    return train_imagenet.create_model(train_imagenet.create_parser().parse_args(["--data-dir", "x", *args]))


def test_model_settings_come_from_the_model() -> None:
    # any timm model: no ConvNeXt-only argument (ls_init_value) forced on it; its own drop path default kept
    resnet = _model("--model", "resnet18", "--num-classes", "3")
    assert resnet.fc.out_features == 3
    # the recipe's stochastic depth is looked up by architecture, so a pretrained tag does not hide it
    args = train_imagenet.create_parser().parse_args(["--data-dir", "x", "--model", "convnext_tiny.fb_in1k"])
    assert train_imagenet.resolve_drop_path(args) == 0.1
    args.model = "mrconvnext_small"
    assert train_imagenet.resolve_drop_path(args) == 0.4
    # MRConvNeXt kernels planned for --img-size, also when the name carries a pretrained tag
    tagged = [name for name in get_arch_pretrained_cfgs("mrconvnext_atto") if split_model_name_tag(name)[1]]
    assert tagged, "mrconvnext_atto has no tagged pretrained cfg"
    for name in ("mrconvnext_atto", *tagged):
        model = _model("--model", name, "--img-size", "64", "--num-classes", "2")
        assert model.img_size == (64, 64), name
        assert [cfg["seq_len"] for cfg in model.mrconv_cfgs] == [256, 64, 16, 4], name
    # the layer-scale init is the model's own (ConvNeXt: 1e-6) unless the flag sets it
    model = _model("--model", "mrconvnext_atto", "--img-size", "32", "--layer-scale-init-value", "0.5")
    assert torch.all(model.stages[0].blocks[0].gamma == 0.5)
