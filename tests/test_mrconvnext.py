"""MRConvNeXt models: registry, structure (paper Appendix D.5), timm API, and train/deploy equivalence."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from timm.optim import param_groups_weight_decay
from timm.utils import reparameterize_model

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext import MRConv2d
from mrconvnext.models.mrconvnext import MRConvNeXt

from .reference import randomize_, rel_err

MODELS = ["mrconvnext_atto", "mrconvnext_nano", "mrconvnext_tiny", "mrconvnext_small", "mrconvnext_base"]
CONVNEXT = {name: name.replace("mrconvnext", "convnext") for name in MODELS}


def _mrconvs(model: torch.nn.Module) -> list[MRConv2d]:
    return [m for m in model.modules() if isinstance(m, MRConv2d)]


def _randomize_model_(model: MRConvNeXt, seed: int = 0) -> None:
    """Random MRConv parameters and BN statistics, and layer scales large enough that every block matters."""
    torch.manual_seed(seed)
    for layer in _mrconvs(model):
        randomize_(layer)
        with torch.no_grad():  # keep activations O(1) through the residual stream
            for param in layer.parameters():
                param.mul_(0.3)
            if hasattr(layer, "norm"):
                layer.norm.running_var.mul_(layer.dim)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.2, 0.6)


def test_registry_lists_every_variant() -> None:
    assert timm.list_models("mrconvnext*") == sorted(MODELS)
    for name in MODELS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size == (3, 224, 224) and cfg.pool_size == (7, 7)
        assert cfg.first_conv == "stem.0" and cfg.classifier == "head.fc"
        assert cfg.test_input_size is None  # accuracy at other sizes is not measured


@pytest.mark.parametrize("name", MODELS)
def test_structure_matches_paper(name: str) -> None:
    """ConvNeXt with every depthwise conv replaced by MRConv2d of the Appendix D.5 configuration."""
    model = timm.create_model(name, device="meta")
    convnext = timm.create_model(CONVNEXT[name], device="meta")
    layers = _mrconvs(model)
    assert len(layers) == sum(len(stage.blocks) for stage in convnext.stages)
    expected = {  # stage width -> (seq_len, l_0, number of resolutions) at 224 x 224
        0: (3136, 196, 5),
        1: (784, 49, 5),
        2: (196, 28, 4),
        3: (49, 28, 2),
    }
    for stage_idx, stage in enumerate(model.stages):
        seq_len, kernel_size, num_res = expected[stage_idx]
        for block in stage.blocks:
            conv = block.conv_dw
            assert isinstance(conv, MRConv2d) and conv.dim == convnext.stages[stage_idx].blocks[0].conv_dw.in_channels
            assert (conv.seq_len, conv.kernel_size, conv.num_resolutions) == (seq_len, kernel_size, num_res)
            assert conv.kernel_type == "fourier_sparse" and conv.bidirectional
    # everything except the depthwise convs is ConvNeXt's
    ours = {k: v.shape for k, v in model.state_dict().items() if ".conv_dw." not in k}
    theirs = {k: v.shape for k, v in convnext.state_dict().items() if ".conv_dw." not in k}
    assert ours == theirs


def test_sequence_lengths_follow_img_size_and_kernel_type() -> None:
    model = timm.create_model("mrconvnext_tiny", img_size=(64, 96), kernel_type="fourier", device="meta")
    got = [(s.blocks[0].conv_dw.seq_len, s.blocks[0].conv_dw.kernel_size) for s in model.stages]
    assert got == [(16 * 24, 196), (8 * 12, 49), (4 * 6, 24), (2 * 3, 6)]
    assert all(layer.kernel_type == "fourier" for layer in _mrconvs(model))
    with pytest.raises(ValueError, match="too small"):
        timm.create_model("mrconvnext_atto", img_size=16)
    with pytest.raises(ValueError, match="one length per stage"):
        timm.create_model("mrconvnext_atto", kernel_sizes=(196, 49))


def test_paper_parameter_counts() -> None:
    """Appendix D.5 Table 12 (Fourier + Sparse): T 32M, S 57M, B 98M."""
    counts = {n: sum(p.numel() for p in timm.create_model(n, device="meta").parameters()) for n in MODELS[2:]}
    for name, paper in zip(MODELS[2:], (32e6, 57e6, 98e6), strict=True):
        assert abs(counts[name] - paper) < 0.75e6, (name, counts[name])


@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("mrconvnext_atto", {}, 224),
        ("mrconvnext_atto", {}, (96, 160)),
        ("mrconvnext_nano", {}, 224),
        ("mrconvnext_nano", {}, 128),
        ("mrconvnext_tiny", dict(img_size=64), 64),
        ("mrconvnext_tiny", dict(img_size=64), 96),
    ],
)
def test_forward_backward_reaches_every_parameter(name: str, kwargs: dict, size) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **kwargs)
    height, width = (size, size) if isinstance(size, int) else size
    batch = 1 if name == "mrconvnext_nano" else 2  # BatchNorm statistics are over batch and sequence
    out = model(torch.randn(batch, 3, height, width))
    assert out.shape == (batch, 7) and torch.isfinite(out).all()
    out.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_channels_last_model_gives_same_output() -> None:
    """timm's --channels-last does ``model.to(memory_format=torch.channels_last)``: no 5-D tensors may break it."""
    torch.manual_seed(0)
    model = timm.create_model("mrconvnext_atto", img_size=64).eval()
    _randomize_model_(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        assert rel_err(model(x.contiguous(memory_format=torch.channels_last)), expected) < 1e-5
        model.reparameterize()
        assert rel_err(model(x), expected) < 1e-4


def test_timm_api() -> None:
    model = timm.create_model("mrconvnext_atto", img_size=64, num_classes=5, global_pool="max").eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.num_features == model.head_hidden_size == 320
    dropped = timm.create_model("mrconvnext_atto", img_size=64, drop_path_rate=0.1, device="meta")
    assert dropped.stages[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert model.get_classifier().out_features == 5 and model.head.global_pool.pool_type == "max"
    feats = model.forward_features(x)
    assert feats.shape == (2, 320, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 320)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 320)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.named_parameters()))
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert [t.shape[1:] for t in intermediates] == [(40, 16, 16), (80, 8, 8), (160, 4, 4), (320, 2, 2)]
    assert model.prune_intermediate_layers([1]) == [1]
    assert len(model.stages) == 2


def test_features_only() -> None:
    model = timm.create_model("mrconvnext_atto", img_size=64, features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.reduction() == [8, 32]
    assert model.feature_info.channels() == [80, 320]
    feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 80, 8, 8), (1, 320, 2, 2)]
    full = timm.create_model("mrconvnext_atto", img_size=64, features_only=True)
    assert full.feature_info.reduction() == [4, 8, 16, 32]


def test_grad_checkpointing_same_output_and_grads() -> None:
    torch.manual_seed(0)
    model = timm.create_model("mrconvnext_atto", img_size=64).eval()
    _randomize_model_(model)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], rtol=1e-5, atol=1e-7)


def test_no_weight_decay_covers_per_branch_gains() -> None:
    model = timm.create_model("mrconvnext_atto", img_size=64)
    groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert "stages.0.blocks.0.conv_dw.alpha" in names and "stages.0.blocks.0.conv_dw.norm.weight" in names
    assert "stages.0.blocks.0.conv_dw.kernel.scale" in names
    assert "stages.0.blocks.0.conv_dw.kernel.fourier.modes" not in names


@pytest.mark.parametrize("name,img_size", [("mrconvnext_atto", 224), ("mrconvnext_tiny", 64)])
def test_train_and_deploy_forms_agree(name: str, img_size: int) -> None:
    """Eval-mode logits of the train form equal those of every deploy path (rel. err < 1e-4, float32)."""
    model = timm.create_model(name, img_size=img_size).eval()
    _randomize_model_(model)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        ref = model(x)
        via_timm = reparameterize_model(model)  # deep copy
        assert via_timm.deploy and all(layer.deploy for layer in _mrconvs(via_timm))
        assert not model.deploy and not any(layer.deploy for layer in _mrconvs(model))
        assert rel_err(via_timm(x), ref) < 1e-4

        model.reparameterize()
        assert model.deploy and all(layer.deploy for layer in _mrconvs(model))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.reparameterize()  # idempotent
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert rel_err(model(x), ref) < 1e-4
        for key, value in via_timm.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)

        deployed = timm.create_model(name, img_size=img_size, deploy=True).eval()
        assert deployed.state_dict().keys() == state.keys()
        deployed.load_state_dict(state, strict=True)
        assert rel_err(deployed(x), ref) < 1e-4

        # the comparison is sensitive: dropping one MRConv's bias moves the logits far beyond the tolerance
        deployed.stages[1].blocks[0].conv_dw.bias.zero_()
        assert rel_err(deployed(x), ref) > 1e-3


def test_another_input_size_warns_once_naming_both_sizes() -> None:
    model = timm.create_model("mrconvnext_atto", img_size=64).eval()
    message = r"planned for img_size=64 gets 96 x 96 inputs.*img_size=96"
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default filter: once per call site
        model(torch.randn(1, 3, 64, 64))
        assert not caught  # the planned size: silent
        for _ in range(3):
            model(torch.randn(1, 3, 96, 96))
        model.forward_intermediates(torch.randn(1, 3, 96, 96))
    assert len(caught) == 2 and all(re.search(message, str(w.message)) for w in caught)  # forward, intermediates
    with pytest.warns(UserWarning, match=r"img_size=\(64, 96\)"):
        timm.create_model("mrconvnext_atto", img_size=(64, 96), features_only=True)(torch.randn(1, 3, 64, 64))


def test_fx_traced_model_is_exact_and_still_warns() -> None:
    """MRConv layers are leaves of timm's FX traces; the planned-size check stays in the traced graph."""
    from timm.models import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    model = timm.create_model("mrconvnext_atto", img_size=64).eval()
    _randomize_model_(model)
    nodes = get_graph_node_names(model)[1]
    assert "stages.0.blocks.0.conv_dw" in nodes  # one node per MRConv2d: not traced through
    traced = create_feature_extractor(model, return_nodes=[nodes[-1]])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced(x)[nodes[-1]], model(x))
        with pytest.warns(UserWarning, match="planned for img_size=64 gets 32 x 32"):
            traced(torch.randn(2, 3, 32, 32))


def test_timm_scripts_plan_the_model_for_their_data_size() -> None:
    """The cfgs' fixed_input_size: timm's resolve_model_input_args passes the data size as img_size (train.py,
    validate.py, benchmark.py and this project's tools), while the model still runs at any size."""
    from timm.data import resolve_input_data_config
    from timm.models import get_model_input_config, resolve_model_input_args

    args = resolve_model_input_args("mrconvnext_atto", {"img_size": 96})
    model = timm.create_model(**args, device="meta")
    assert model.img_size == (96, 96) and [c["seq_len"] for c in model.mrconv_cfgs] == [576, 144, 36, 9]
    assert timm.create_model("mrconvnext_atto", device="meta").img_size == (224, 224)
    assert not get_model_input_config(model)["fixed_input_size"]
    assert resolve_input_data_config(model, {"img_size": 128})["input_size"] == (3, 128, 128)  # warns, not refuses
    with pytest.raises(ValueError, match="Conflicting input image sizes"):
        resolve_model_input_args("mrconvnext_atto", {"img_size": 96}, img_size=224)


def _grad_layout_mismatches(model: torch.nn.Module, size: int, channels_last: bool) -> list[str]:
    x = torch.randn(2, 3, size, size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    return [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_have_their_parameters_strides(channels_last: bool) -> None:
    """The layout DDP's gradient buckets expect: every gradient has its parameter's strides, also on size-1 dims.

    With 2 threads oneDNN returns channels-last weight gradients for 1x1 convolutions of channels-last inputs (what
    the conv_mlp blocks get from LayerNorm2d); ``.to(memory_format=torch.channels_last)`` must not restride the 4-D
    MRConv kernels either. timm's convnext_atto shows the first (a test that it can fail) at the same size.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = timm.create_model("mrconvnext_atto", img_size=64, num_classes=4)
        assert _grad_layout_mismatches(model, 64, channels_last) == []
        if not channels_last:
            assert any(".mlp.fc" in n for n in _grad_layout_mismatches(timm.create_model("convnext_atto"), 64, False))
    finally:
        torch.set_num_threads(threads)


DDP_RUN = r"""
import json, os, sys, warnings
import torch, torch.distributed as dist, torch.multiprocessing as mp
import timm
import mrconvnext  # noqa: F401

def run(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(2)
    found = {}
    # torch warns once per process: the mrconvnext runs come first, convnext_atto (which warns) last
    for name, channels_last in (("mrconvnext_atto", False), ("mrconvnext_atto", True), ("convnext_atto", False)):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=4, **({"img_size": 64} if name.startswith("mr") else {}))
        x = torch.randn(2, 3, 64, 64)
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                with ddp.no_sync():  # gradient accumulation: the reducer meets gradients autograd accumulated
                    ddp(x).sum().backward()
                ddp(x).sum().backward()
        found[f"{name} channels_last={channels_last}"] = [str(w.message) for w in caught if "Grad strides" in str(w.message)]
    if rank == 0:
        print(json.dumps(found))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(int(sys.argv[1]),), nprocs=2)
"""


def test_ddp_two_processes_copy_no_gradients(tmp_path) -> None:
    """2 gloo processes: no "Grad strides do not match bucket view strides" for mrconvnext_atto (channels-first and
    channels-last), while convnext_atto's 7x7 depthwise weights do trigger it in the same processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_RUN)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, str(script), str(port)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["mrconvnext_atto channels_last=False"] == [] and found["mrconvnext_atto channels_last=True"] == []
    assert found["convnext_atto channels_last=False"], found
