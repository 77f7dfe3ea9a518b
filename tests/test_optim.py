import pytest
import timm
import torch
import torch.nn as nn

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext import MRConv, MRConv2d, mrconv_param_groups


def group_of(groups):
    """Map parameter id -> index of the group holding it; fails on a parameter held twice."""
    owner = {}
    for index, group in enumerate(groups):
        for param in group["params"]:
            assert id(param) not in owner, "parameter in two groups"
            owner[id(param)] = index
    return owner


def kind(groups, index):
    group = groups[index]
    if "lr" in group:
        return "kernel"
    return "no_decay" if group["weight_decay"] == 0 else "decay"


@pytest.mark.parametrize("deploy", [False, True])
def test_sequence_model_groups(deploy):
    model = timm.create_model("mrconv_pathfinder_base", seq_len=128, depth=2, embed_dim=16)
    if deploy:
        model.eval().reparameterize()
    groups = mrconv_param_groups(model, weight_decay=0.03, kernel_lr=1e-3)
    owner = group_of(groups)
    names = dict(model.named_parameters())
    assert set(owner) == {id(p) for p in names.values()}
    for group in groups:
        if kind(groups, groups.index(group)) == "kernel":
            assert group["lr"] == 1e-3 and group["weight_decay"] == 0.0
        else:
            assert "lr" not in group and group["weight_decay"] in (0.0, 0.03)
    kinds = {name: kind(groups, owner[id(p)]) for name, p in names.items()}
    for name, got in kinds.items():
        if ".conv.kernel." in name or (deploy and name.endswith(".conv.weight")):
            expected = "kernel"
        elif (
            ".conv.norm." in name
            or name.endswith((".conv.alpha", ".bias", ".skip"))
            or ".norm." in name
            or name.startswith("norm.")
        ):
            expected = "no_decay"
        else:
            expected = "decay"
        assert got == expected, (name, got, expected)
    # the kernel group holds the sub-kernels of every layer (Fourier modes, sparse taps and their scales)
    num_scales = sum(n.endswith(".kernel.scale") for n, k in kinds.items() if k == "kernel")
    assert num_scales == (0 if deploy else 2)
    assert {k for n, k in kinds.items() if n in ("encoder.weight", "blocks.0.proj.weight", "head.weight")} == {"decay"}


def test_groups_drive_adamw_and_skip_frozen_and_listed_parameters():
    model = timm.create_model("mrconv_listops_base", seq_len=64, depth=1, embed_dim=8)
    model.encoder.weight.requires_grad_(False)
    groups = mrconv_param_groups(model, weight_decay=0.1, kernel_lr=5e-4, no_weight_decay_list=["head.weight"])
    owner = group_of(groups)
    assert id(model.encoder.weight) not in owner
    assert kind(groups, owner[id(model.head.weight)]) == "no_decay"
    optimizer = torch.optim.AdamW(groups, lr=0.01)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.01, 5e-4]
    kernel_before = model.blocks[0].conv.kernel.modes.detach().clone()
    model(torch.randint(0, 18, (2, 64))).sum().backward()
    optimizer.step()
    step = (model.blocks[0].conv.kernel.modes - kernel_before).abs().max().item()
    assert 0 < step <= 5e-4 * 1.01  # Adam's first step moves each weight by at most its lr


class TinyConvNet(nn.Module):
    """An MRConvNeXt-like stand-in: 2D stem, MRConv2d token mixer, LayerNorm, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.mixer = MRConv2d(8, 16, 4, kernel_type="fourier_sparse")
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def no_weight_decay(self):
        return {"he*.weight"}  # fnmatch pattern, as timm allows


def test_groups_for_2d_models_and_no_weight_decay_method():
    model = TinyConvNet()
    groups = mrconv_param_groups(model, weight_decay=0.05, kernel_lr=2e-3)
    owner = group_of(groups)
    assert set(owner) == {id(p) for p in model.parameters()}
    layer = model.mixer
    assert isinstance(layer, MRConv)
    assert {kind(groups, owner[id(p)]) for p in layer.kernel.parameters()} == {"kernel"}
    assert {kind(groups, owner[id(p)]) for p in (layer.alpha, layer.norm.weight, layer.norm.bias)} == {"no_decay"}
    assert kind(groups, owner[id(model.head.weight)]) == "no_decay"
    assert kind(groups, owner[id(model.stem.weight)]) == "decay"


def test_groups_for_mrconvnext():
    model = timm.create_model("mrconvnext_atto")
    groups = mrconv_param_groups(model, weight_decay=0.05, kernel_lr=1e-3)
    owner = group_of(groups)
    assert set(owner) == {id(p) for p in model.parameters()}
    layers = [m for m in model.modules() if isinstance(m, MRConv)]
    assert layers
    for layer in layers:
        assert {kind(groups, owner[id(p)]) for p in layer.kernel.parameters()} == {"kernel"}
        assert {kind(groups, owner[id(p)]) for p in (layer.alpha, *layer.norm.parameters())} == {"no_decay"}
    decayed = [n for n, p in model.named_parameters() if kind(groups, owner[id(p)]) == "decay"]
    assert decayed and all(p.ndim >= 2 for n, p in model.named_parameters() if n in decayed)
