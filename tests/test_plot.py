"""``python -m mrconvnext.plot``: every plot kind for MRConvNeXt and a sequence model, train- and deploy-form checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext.layers.mrconv import MRConv, MRConv2d
from mrconvnext.plot import feature_map_kernel, main, plot_model, resolution_shares
from mrconvnext.utils.checkpoint import checkpoint_record, create_model_from_checkpoint, save_checkpoint_file

from .reference import randomize_
from .test_mrconvnext import _randomize_model_

pytest.importorskip("matplotlib")

# kernel_sizes small enough for several resolutions per layer at 32 x 32 (sequence lengths 64, 16, 4, 1)
ATTO_KWARGS = dict(img_size=32, num_classes=3, kernel_sizes=(4, 2, 1, 1))
SEQ_KWARGS = dict(seq_len=64, depth=2, embed_dim=16)
PNG_SIZE = (1000, 800)


def _check_png(path: Path) -> None:
    """A real image: PNG of the documented size, with drawn content (not blank, not one colour)."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == PNG_SIZE, (path, image.format, image.size)
        grey = np.asarray(image.convert("L"), dtype=np.float64)
    assert (grey < 128).mean() > 0.01, f"{path} is nearly blank"
    assert grey.std() > 10 and len(np.unique(grey)) > 20, f"{path} has no content"


@pytest.fixture(scope="module")
def atto() -> torch.nn.Module:
    model = timm.create_model("mrconvnext_atto", **ATTO_KWARGS).eval()
    _randomize_model_(model, seed=4)
    return model


@pytest.fixture(scope="module")
def checkpoints(atto, tmp_path_factory) -> dict[str, Path]:
    """Train form in an older training-script layout (.pth with img_size), deploy form as a bare .safetensors."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {"atto_train": root / "atto_train.pth", "atto_deploy": root / "atto_deploy.safetensors"}
    torch.save({"state_dict": atto.state_dict(), "img_size": 32, "mrconv_norm": "batch"}, paths["atto_train"])
    deployed = copy.deepcopy(atto)
    deployed.reparameterize()
    safetensors.torch.save_file(deployed.state_dict(), paths["atto_deploy"])

    torch.manual_seed(5)
    seq = timm.create_model("mrconv_listops_base", **SEQ_KWARGS).eval()
    for layer in seq.modules():
        if isinstance(layer, MRConv):
            randomize_(layer)
    paths["seq_train"], paths["seq_deploy"] = root / "seq_train.pth", root / "seq_deploy.pth"
    torch.save(seq.state_dict(), paths["seq_train"])
    seq.reparameterize()
    torch.save({"state_dict": seq.state_dict()}, paths["seq_deploy"])
    return paths


ATTO_ARGS = ["--model-kwargs", "kernel_sizes=(4,2,1,1)"]
SEQ_ARGS = ["--model-kwargs", "seq_len=64", "depth=2", "embed_dim=16"]
CASES = {  # checkpoint: model, extra arguments, the PNGs expected
    "atto_train": ("mrconvnext_atto", ATTO_ARGS, ("alpha", "kernels_1d", "kernels_2d", "spectra")),
    "atto_deploy": ("mrconvnext_atto", ATTO_ARGS, ("kernels_1d", "kernels_2d", "spectra")),  # size from shapes
    "seq_train": ("mrconv_listops_base", SEQ_ARGS, ("alpha", "kernels_1d", "spectra")),
    "seq_deploy": ("mrconv_listops_base", SEQ_ARGS, ("kernels_1d", "spectra")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_writes_every_plot_kind(case, checkpoints, tmp_path, capsys) -> None:
    model, extra, kinds = CASES[case]
    out = tmp_path / "plots"
    assert main(["--model", model, "--checkpoint", str(checkpoints[case]), "--out", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{kind}.png" for kind in kinds)  # no temporary files
    for kind in kinds:
        _check_png(out / f"{kind}.png")
        assert f"wrote {out / kind}.png" in printed
    if case.endswith("deploy"):
        assert "alpha.png skipped" in printed and "deploy-form checkpoint" in printed


def test_alpha_of_a_deploy_checkpoint_is_a_clear_error(checkpoints, tmp_path, capsys) -> None:
    argv = ["--model", "mrconv_listops_base", "--checkpoint", str(checkpoints["seq_deploy"]), "--out", str(tmp_path)]
    assert main([*argv, *SEQ_ARGS, "--plots", "alpha"]) == 2
    err = capsys.readouterr().err
    assert "cannot plot 'alpha'" in err and "deploy form" in err and "train-form checkpoint" in err
    assert "Traceback" not in err and not list(tmp_path.glob("*.png"))


def test_mismatched_checkpoint_names_the_file(checkpoints, tmp_path, capsys) -> None:
    argv = ["--model", "mrconvnext_atto", "--checkpoint", str(checkpoints["atto_train"]), "--out", str(tmp_path)]
    assert main(argv) == 2  # without kernel_sizes the sub-kernel shapes differ
    err = capsys.readouterr().err
    assert str(checkpoints["atto_train"]) in err and "does not fit mrconvnext_atto(" in err


def test_loaded_model_matches_the_saved_one(atto, checkpoints) -> None:
    loaded = create_model_from_checkpoint(checkpoints["atto_train"], "mrconvnext_atto", kernel_sizes=(4, 2, 1, 1))
    assert not loaded.deploy and loaded.img_size == (32, 32) and loaded.num_classes == 3
    for key, value in atto.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_scale_form_is_rebuilt_from_the_record(tmp_path, capsys) -> None:
    model = timm.create_model("mrconvnext_atto", **ATTO_KWARGS, mrconv_kwargs=dict(branch_norm="scale"))
    save_checkpoint_file(checkpoint_record(model), tmp_path / "scale.pth")
    assert main(["--checkpoint", str(tmp_path / "scale.pth"), "--out", str(tmp_path / "plots")]) == 0  # no flags
    assert "wrote" in capsys.readouterr().out and (tmp_path / "plots" / "alpha.png").is_file()
    loaded = create_model_from_checkpoint(tmp_path / "scale.pth")
    assert {m.branch_norm for m in loaded.modules() if isinstance(m, MRConv)} == {"scale"}
    shares = resolution_shares(loaded.stages[0].blocks[0].conv_dw)
    assert len(shares) == 5 and shares.sum().item() == pytest.approx(1.0)


def test_resolution_shares_fold_the_batchnorm() -> None:
    """Shares follow ||alpha_i gamma_i / sigma_i k_i||: 3x alpha_1 triples its weight, 4x var_1 halves it."""
    torch.manual_seed(0)
    layer = MRConv(6, 64, 4, kernel_type="fourier_sparse").double().eval()
    randomize_(layer)
    base = resolution_shares(layer)
    assert base.shape == (layer.num_resolutions,) and base.sum().item() == pytest.approx(1.0)
    assert (base > 0).all()
    changed = copy.deepcopy(layer)
    with torch.no_grad():
        changed.alpha[1].mul_(3.0)
        changed.norm.running_var[2].add_(changed.norm.eps).mul_(4.0).sub_(changed.norm.eps)
    shares = resolution_shares(changed)
    ratio = (shares / shares[0]) / (base / base[0])
    torch.testing.assert_close(ratio, torch.tensor([1.0, 3.0, 0.5, 1.0, 1.0, 1.0][: len(base)], dtype=ratio.dtype))


def test_feature_map_kernel_is_what_the_layer_applies() -> None:
    """The folded 2D map equals the layer's own output at the centre pixel for a one-pixel input at each place."""
    torch.manual_seed(1)
    height, width = 5, 6
    layer = MRConv2d(3, height * width, 4, kernel_type="fourier_sparse").double().eval()
    randomize_(layer)
    maps = feature_map_kernel(layer, height, width)
    impulses = torch.eye(height * width, dtype=torch.float64).view(-1, 1, height, width).expand(-1, 3, -1, -1)
    with torch.no_grad():
        out = layer(impulses.contiguous()) - layer(torch.zeros(1, 3, height, width, dtype=torch.float64))
    reference = out[:, :, height // 2, width // 2].T.reshape(3, height, width)  # input pixel -> centre output
    torch.testing.assert_close(maps, reference, rtol=1e-9, atol=1e-12)


def test_channel_choice_is_reproducible(atto, tmp_path) -> None:
    first = plot_model(atto, tmp_path / "a", kinds=("kernels_1d",))[0].read_bytes()
    second = plot_model(atto, tmp_path / "b", kinds=("kernels_1d",))[0].read_bytes()
    assert first == second
    with pytest.raises(ValueError, match="only MRConvNeXt convolves 2D feature maps"):
        plot_model(timm.create_model("mrconv_listops_base", **SEQ_KWARGS), tmp_path / "c", kinds=("kernels_2d",))


def test_a_model_without_mrconv_is_a_clear_error(checkpoints, tmp_path, capsys) -> None:
    argv = ["--model", "convnext_atto", "--checkpoint", str(checkpoints["atto_train"]), "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "expected an MRConvNeXt or MRConv sequence model" in err and "Traceback" not in err
