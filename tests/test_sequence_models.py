import math

import pytest
import timm
import torch
from timm.utils import reparameterize_model

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext import MRConv
from mrconvnext.models import MRConvSequenceModel

from .reference import randomize_, rel_err

NAMES = [f"mrconv_{task}_base" for task in ("listops", "text", "retrieval", "image", "pathfinder", "pathx")]
NAMES += [f"mrconv_{task}_large" for task in ("listops", "text", "retrieval", "image", "pathfinder", "pathx")]
NAMES += ["mrconv_scifar_base", "mrconv_speech_base"]

# (kernel type, depth, width, l_0, bidirectional, norm, prenorm, dropout, seq_len, classes): Tables 5/6, Appendix D
EXPECTED = {
    "mrconv_listops_base": ("fourier", 8, 128, 2, False, "batch", False, 0.05, 2048, 10),
    "mrconv_text_base": ("fourier", 6, 256, 1, True, "batch", True, 0.05, 4096, 2),
    "mrconv_retrieval_base": ("fourier", 6, 256, 1, True, "batch", True, 0.05, 4000, 2),
    "mrconv_image_base": ("dilated", 6, 512, 8, False, "layer", False, 0.1, 1024, 10),
    "mrconv_pathfinder_base": ("fourier_sparse", 6, 256, 16, True, "batch", True, 0.1, 1024, 2),
    "mrconv_pathx_base": ("fourier", 6, 256, 64, True, "batch", True, 0.0, 16384, 2),
    "mrconv_scifar_base": ("dilated", 10, 512, 8, False, "layer", False, 0.2, 1024, 10),
    "mrconv_speech_base": ("fourier", 6, 128, 32, True, "batch", True, 0.1, 16000, 35),
    "mrconv_listops_large": ("fourier", 16, 128, 1, False, "batch", False, 0.05, 2048, 10),
    "mrconv_text_large": ("fourier_sparse", 6, 384, 1, True, "batch", True, 0.1, 4096, 2),
    "mrconv_retrieval_large": ("fourier", 6, 384, 1, True, "batch", True, 0.0, 4000, 2),
    "mrconv_image_large": ("dilated", 10, 512, 8, False, "layer", False, 0.2, 1024, 10),
    "mrconv_pathfinder_large": ("fourier_sparse", 12, 256, 32, True, "batch", True, 0.05, 1024, 2),
    "mrconv_pathx_large": ("fourier", 12, 256, 64, True, "batch", True, 0.0, 16384, 2),
}


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def small_model(
    bidirectional=True, kernel_type="fourier", block_norm="batch", prenorm=False, combine="sum", kernel_size=4, **kwargs
):
    torch.manual_seed(0)
    args = dict(num_classes=3, seq_len=48, embed_dim=8, depth=2, vocab_size=11)
    args.update(kwargs)
    mrconv_kwargs = dict(kernel_size=kernel_size, kernel_type=kernel_type, bidirectional=bidirectional, combine=combine)
    return MRConvSequenceModel(block_norm=block_norm, prenorm=prenorm, mrconv_kwargs=mrconv_kwargs, **args)


def randomize_model_(model):
    """Random MRConv parameters and BN statistics, and random statistics for the block norms."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MRConv):
                randomize_(module)
            elif isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.3)


def example_input(model, batch, length):
    if model.vocab_size is not None:
        shape = (batch, 2, length) if model.pair_input else (batch, length)
        return torch.randint(0, model.vocab_size, shape)
    return torch.randn(batch, length, model.in_chans)


def test_registered_models():
    assert sorted(timm.list_models("mrconv_*")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_matches_paper_tables(name):
    model = timm.create_model(name)
    kernel_type, depth, width, l0, bidirectional, norm, prenorm, drop, seq_len, classes = EXPECTED[name]
    conv = model.blocks[0].conv
    assert len(model.blocks) == depth and model.num_features == width and model.num_classes == classes
    assert (conv.kernel_type, conv.kernel_size, conv.bidirectional, conv.seq_len) == (
        kernel_type,
        l0,
        bidirectional,
        seq_len,
    )
    assert model.blocks[0].prenorm == prenorm and model.blocks[0].drop.p == drop
    assert isinstance(model.blocks[0].norm, torch.nn.BatchNorm1d) == (norm == "batch")
    assert conv.combine == ("concat" if "pathx" in name else "sum")
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == classes and math.prod(cfg["input_size"][1:]) == seq_len
    assert cfg["input_size"][0] == (model.in_chans if model.vocab_size is None else 1)


def test_parameter_counts_reproduce_paper_and_support_inferred_directions():
    """Tables 2 and 10 counts, which pin down the causal ListOps / Image / sCIFAR models."""

    def count(name, **mrconv_kwargs):
        return num_params(timm.create_model(name, mrconv_kwargs=mrconv_kwargs))

    reported = [
        (("mrconv_listops_large",), {}, 661e3),  # Table 2, 2x depth
        (("mrconv_listops_base",), dict(kernel_size=1), 332e3),  # Table 2, + BatchNorm
        (("mrconv_listops_base",), dict(kernel_type="dense", kernel_size=2048), 2.4e6),  # Table 2, dense
        (("mrconv_image_base",), dict(kernel_type="dense", kernel_size=1024), 6.3e6),  # Table 2, dense
        (("mrconv_image_base",), dict(kernel_type="fourier", kernel_size=32), 3.8e6),  # Table 2, Fourier
    ]
    for (name,), kwargs, paper in reported:
        causal = count(name, **kwargs)
        bidirectional = count(name, bidirectional=True, **kwargs)
        assert abs(causal - paper) / paper < 0.02, (name, kwargs, causal, paper)
        assert abs(bidirectional - paper) / paper > 0.04, (name, kwargs, bidirectional, paper)
    for depth, paper in ((6, 3.4e6), (8, 4.6e6), (10, 5.7e6)):  # Table 10
        causal = num_params(timm.create_model("mrconv_scifar_base", depth=depth))
        bidirectional = num_params(
            timm.create_model("mrconv_scifar_base", depth=depth, mrconv_kwargs=dict(bidirectional=True))
        )
        assert abs(causal - paper) / paper < 0.02, (depth, causal, paper)
        assert abs(bidirectional - paper) / paper > 0.04, (depth, bidirectional, paper)


@pytest.mark.parametrize("name", NAMES)
def test_every_config_runs_forward_backward(name):
    """Registered config on a short input of its type (seq_len capped at 256 to keep kernels cheap)."""
    seq_len = min(EXPECTED[name][8], 256)
    torch.manual_seed(0)
    model = timm.create_model(name, seq_len=seq_len)
    x = example_input(model, 2, 64)
    lengths = torch.tensor([[64, 40], [33, 64]]) if model.pair_input else torch.tensor([64, 37])
    out = model(x, lengths=lengths)
    assert out.shape == (2, EXPECTED[name][9]) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_config_runs_forward_backward_at_registered_length(name):
    model = timm.create_model(name)
    x = example_input(model, 2, 64)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_padding_content_does_not_change_output(bidirectional, train):
    model = small_model(bidirectional=bidirectional, kernel_type="fourier_sparse")
    randomize_model_(model)
    model.train(train)
    x = torch.randint(1, 11, (3, 40))
    lengths = torch.tensor([40, 17, 5])
    other = x.clone()
    for b, n in enumerate(lengths.tolist()):
        other[b, n:] = torch.randint(0, 11, (40 - n,))
    assert not torch.equal(x, other)
    torch.manual_seed(1)  # identical dropout masks (drop_rate is 0 here anyway)
    y = model(x, lengths=lengths)
    torch.manual_seed(1)
    y_other = model(other, lengths=lengths)
    assert rel_err(y_other, y) < 1e-5
    # without lengths the padding is content, and a bidirectional model sees it everywhere
    if bidirectional and not train:
        assert rel_err(model.forward_features(other)[1, :17], model.forward_features(x)[1, :17]) > 1e-3


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_padded_batch_matches_each_unpadded_sequence(bidirectional, norm):
    """Independent check of masking and pooling: run every sequence alone at its true length."""
    model = small_model(bidirectional=bidirectional, block_norm=norm, prenorm=norm == "layer", kernel_type="dilated")
    randomize_model_(model)
    model.eval()
    x = torch.randint(0, 11, (3, 48))
    lengths = torch.tensor([48, 30, 9])
    batched = model(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = model(x[b : b + 1, :n])
        assert rel_err(batched[b : b + 1], alone) < 1e-5


def test_pair_pooling_and_head_match_manual_computation():
    model = small_model(pair_input=True, vocab_size=7, num_classes=2)
    randomize_model_(model)
    model.eval()
    x = torch.randint(0, 7, (2, 2, 32))
    lengths = torch.tensor([[32, 11], [4, 20]])
    features = model.forward_features(x, lengths=lengths)
    assert features.shape == (2, 2, 32, 8)
    pooled = torch.stack(
        [torch.stack([features[b, z, : lengths[b, z]].mean(0) for z in range(2)]) for b in range(2)]
    )  # (B, 2, D)
    x1, x2 = pooled[:, 0], pooled[:, 1]
    hidden = torch.relu(model.pre_logits[0](torch.cat([x1, x2, x1 - x2, x1 * x2], dim=-1)))
    assert rel_err(model(x, lengths=lengths), model.head(hidden)) < 1e-5
    # each document of a pair is encoded independently of the other (eval mode)
    swapped = model.forward_features(x.flip(1), lengths=lengths.flip(1))
    assert rel_err(swapped.flip(1), features) < 1e-5


def test_image_input_is_flattened_row_major():
    model = small_model(vocab_size=None, in_chans=3, image_input=True, seq_len=64)
    randomize_model_(model)
    model.eval()
    images = torch.randn(2, 3, 8, 8)
    sequence = images.permute(0, 2, 3, 1).reshape(2, 64, 3)
    assert torch.equal(model(images), model(sequence))


def test_resampling_fourier_model_zero_shot():
    """A 2x decimated smooth signal with ``rate=2`` gives nearly the logits of the full-rate signal."""
    model = small_model(vocab_size=None, in_chans=1, seq_len=256, kernel_size=16, embed_dim=16)
    randomize_model_(model)
    model.eval()
    t = torch.arange(256) / 256
    x = sum(torch.sin(2 * math.pi * f * t + p) for f, p in [(1, 0.3), (3, 1.0), (5, 2.0)])[None, :, None]
    full = model(x)
    resampled = model(x[:, ::2], rate=2)
    naive = model(x[:, ::2])
    assert rel_err(resampled, full) < 0.15
    assert rel_err(resampled, full) < 0.3 * rel_err(naive, full)


@pytest.mark.parametrize("kernel_type", ["dilated", "sparse", "fourier_sparse"])
def test_resampling_unsupported_kernels_raise(kernel_type):
    model = small_model(kernel_type=kernel_type)
    with pytest.raises(ValueError, match="cannot be resampled"):
        model(torch.randint(0, 11, (1, 24)), rate=2)


@pytest.mark.parametrize("kernel_type", ["dense", "dilated", "fourier", "sparse", "fourier_sparse"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_reparameterize_matches_train_form(kernel_type, bidirectional, combine):
    model = small_model(bidirectional=bidirectional, kernel_type=kernel_type, combine=combine)
    _check_reparameterization(model)


@pytest.mark.parametrize("name", ["mrconv_pathx_base", "mrconv_image_base", "mrconv_speech_base"])
def test_reparameterize_registered_configs(name):
    model = timm.create_model(name, seq_len=256, embed_dim=16, depth=2)
    _check_reparameterization(model)


def _check_reparameterization(model):
    randomize_model_(model)
    model.eval()
    x = example_input(model, 2, 40)
    lengths = torch.tensor([[40, 23], [7, 40]]) if model.pair_input else torch.tensor([40, 23])
    with torch.no_grad():
        expected = model(x, lengths=lengths)
        fused = reparameterize_model(model)  # timm: on a copy
        assert all(m.deploy for m in fused.modules() if isinstance(m, MRConv))
        assert not any(m.deploy for m in model.modules() if isinstance(m, MRConv))
        assert rel_err(fused(x, lengths=lengths), expected) < 1e-4
        model.reparameterize()
        assert rel_err(model(x, lengths=lengths), expected) < 1e-4
        deployed = MRConvSequenceModel(**_init_args(model), deploy=True).eval()
        deployed.load_state_dict(model.state_dict())
        assert rel_err(deployed(x, lengths=lengths), expected) < 1e-4
    with pytest.raises(ValueError, match="reparameterized"):
        model(x, rate=2)


def _init_args(model):
    conv, block = model.blocks[0].conv, model.blocks[0]
    return dict(
        num_classes=model.num_classes,
        seq_len=model.seq_len,
        vocab_size=model.vocab_size,
        in_chans=model.in_chans,
        embed_dim=model.num_features,
        depth=len(model.blocks),
        mrconv_kwargs=dict(
            kernel_size=conv.kernel_size,
            kernel_type=conv.kernel_type,
            bidirectional=conv.bidirectional,
            combine=conv.combine,
        ),
        block_norm="batch" if isinstance(block.norm, torch.nn.BatchNorm1d) else "layer",
        prenorm=block.prenorm,
        pair_input=model.pair_input,
        image_input=model.image_input,
    )


def test_keyword_overrides_and_classifier_reset():
    model = timm.create_model("mrconv_scifar_base", depth=6, embed_dim=64, num_classes=5, drop_rate=0.0)
    assert len(model.blocks) == 6 and model.num_features == 64 and model.head.out_features == 5
    assert model.blocks[0].drop.p == 0.0
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 64)
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7
    speech = timm.create_model(
        "mrconv_speech_base", seq_len=128, mrconv_kwargs=dict(kernel_type="dilated", bidirectional=False)
    )
    conv = speech.blocks[0].conv
    assert conv.kernel_type == "dilated" and not conv.bidirectional and conv.kernel_size == 32  # the rest kept


def test_every_mrconv_option_reaches_the_layers_and_block_norm_is_separate():
    model = timm.create_model("mrconv_listops_base", seq_len=64, depth=2, mrconv_kwargs=dict(branch_norm="scale"))

    def keys(**norm):
        return set(MRConv(128, 64, kernel_size=2, kernel_type="fourier", bidirectional=False, **norm).state_dict())

    assert keys(branch_norm="scale") != keys(branch_norm="batch")
    convs = [m for m in model.modules() if isinstance(m, MRConv)]
    assert len(convs) == 2 and all(set(c.state_dict()) == keys(branch_norm="scale") for c in convs)
    assert all(isinstance(block.norm, torch.nn.BatchNorm1d) for block in model.blocks)
    layer = timm.create_model("mrconv_listops_base", seq_len=64, depth=2, block_norm="layer")
    assert all(set(c.state_dict()) == keys(branch_norm="batch") for c in layer.modules() if isinstance(c, MRConv))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in layer.blocks.modules())
    out = model(torch.randint(0, 18, (2, 64)), lengths=torch.tensor([64, 30]))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_input_checks_read_no_device_values():
    """Range checks run only on CPU tensors: ``meta`` tensors stand in for accelerator ones (reading a value raises)."""
    model = small_model()
    tokens = torch.empty(2, 10, dtype=torch.long, device="meta")
    assert model.inputs.check_input(tokens).shape == (2, 10)
    assert model.inputs.check_lengths(torch.empty(2, dtype=torch.long, device="meta"), 2, 10).shape == (2,)
    with pytest.raises(ValueError, match=r"lengths of shape \(2,\)"):  # shape checks still apply
        model.inputs.check_lengths(torch.empty(3, dtype=torch.long, device="meta"), 2, 10)


def test_pretrained_fails_clearly_and_local_weights_load(tmp_path):
    with pytest.raises(RuntimeError, match="No pretrained weights exist for mrconv_listops_base") as info:
        timm.create_model("mrconv_listops_base", pretrained=True)
    assert "pretrained_cfg_overlay=dict(file=" in str(info.value) and "checkpoint_path" in str(info.value)
    torch.manual_seed(0)
    source = timm.create_model("mrconv_listops_base", depth=2)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    for kwargs in (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), dict(checkpoint_path=str(path))):
        loaded = timm.create_model("mrconv_listops_base", depth=2, **kwargs)
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_bad_inputs_raise_clear_errors():
    tokens = small_model()
    with pytest.raises(TypeError, match="integer token ids"):
        tokens(torch.randn(2, 10))
    with pytest.raises(ValueError, match=r"shape \(B, L\)"):
        tokens(torch.randint(0, 11, (2, 3, 10)))
    with pytest.raises(ValueError, match=r"token ids in \[0, 11\)"):
        tokens(torch.full((2, 10), 11))
    with pytest.raises(ValueError, match=r"lengths of shape \(2,\)"):
        tokens(torch.randint(0, 11, (2, 10)), lengths=torch.tensor([3]))
    with pytest.raises(TypeError, match="integer lengths"):
        tokens(torch.randint(0, 11, (2, 10)), lengths=torch.tensor([3.0, 4.0]))
    for bad in ([0, 4], [3, 11]):
        with pytest.raises(ValueError, match="1 <= lengths <= L=10"):
            tokens(torch.randint(0, 11, (2, 10)), lengths=torch.tensor(bad))
    pair = small_model(pair_input=True)
    with pytest.raises(ValueError, match=r"shape \(B, 2, L\)"):
        pair(torch.randint(0, 11, (2, 10)))
    with pytest.raises(ValueError, match=r"lengths of shape \(2, 2\)"):
        pair(torch.randint(0, 11, (2, 2, 10)), lengths=torch.tensor([3, 4]))
    continuous = small_model(vocab_size=None, in_chans=2)
    with pytest.raises(TypeError, match="floating-point"):
        continuous(torch.randint(0, 3, (2, 10, 2)))
    with pytest.raises(ValueError, match="in_chans=2"):
        continuous(torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match=r"\(B, L, in_chans\)"):
        continuous(torch.randn(2, 2, 4, 4))  # not an image model
    images = small_model(vocab_size=None, in_chans=3, image_input=True)
    with pytest.raises(ValueError, match="3 channels"):
        images(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="token models take one id per position"):
        MRConvSequenceModel(vocab_size=10, in_chans=3)
    with pytest.raises(ValueError, match="unknown block_norm"):
        small_model(block_norm="group")


def test_device_and_dtype_reach_every_tensor():
    """timm's factory arguments: created on the device and in the dtype asked for; a new head keeps both."""
    for kwargs in (dict(device="meta"), dict(device="meta", dtype=torch.float64), dict(dtype=torch.float64)):
        model = timm.create_model("mrconv_pathfinder_base", depth=2, embed_dim=8, **kwargs)
        device, dtype = torch.device(kwargs.get("device", "cpu")), kwargs.get("dtype", torch.float32)
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        assert [n for n, t in tensors.items() if t.device != device] == []
        assert [n for n, t in tensors.items() if t.is_floating_point() and t.dtype != dtype] == []
        model.reset_classifier(4)
        assert model.head.weight.device == device and model.head.weight.dtype == dtype
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert timm.create_model("mrconv_pathfinder_base", depth=2, dtype=torch.float64)(x).dtype == torch.float64


@pytest.mark.parametrize("name", ["mrconv_pathfinder_base", "mrconv_listops_base", "mrconv_retrieval_base"])
def test_forward_intermediates_and_features_only(name):
    """One output per block (timm's ``forward_intermediates``, ``features_only=True``), in the layouts it names."""
    torch.manual_seed(0)
    model = timm.create_model(name, seq_len=64, depth=3, embed_dim=8).eval()
    randomize_model_(model)
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in model.feature_info] == [
        (8, 1, f"blocks.{i}") for i in range(3)
    ]
    if name == "mrconv_pathfinder_base":
        x, lengths, grid = torch.randn(2, 1, 8, 8), None, (8, 8)
    else:
        x = torch.randint(1, model.vocab_size, (2, 2, 64) if model.pair_input else (2, 64))
        lengths, grid = torch.tensor([[64, 40], [30, 64]] if model.pair_input else [64, 30]), None
    with torch.no_grad():
        final, blocks = model.forward_intermediates(x, lengths=lengths)
        torch.testing.assert_close(final, model.forward_features(x, lengths))
        # the same values as every block's output of an explicit pass, back in (B, [2,] D, L) or (B, D, H, W)
        seqs, mask = model.inputs(x, lengths)
        h = model.encoder(seqs).transpose(1, 2) * (mask if mask is not None else 1)
        for block, got in zip(model.blocks, blocks, strict=True):
            h = block(h, mask)
            want = h.view(2, -1, *h.shape[1:]).transpose(0, 1) if model.pair_input else h
            torch.testing.assert_close(got, want.unflatten(-1, grid) if grid else want)
        nlc = model.forward_intermediates(x, indices=[0, 2], output_fmt="NLC", intermediates_only=True, lengths=lengths)
        torch.testing.assert_close(
            nlc[1], blocks[2].flatten(-2).transpose(-1, -2) if grid else blocks[2].transpose(-1, -2)
        )
        assert len(model.forward_intermediates(x, indices=1, stop_early=True, lengths=lengths)[1]) == 1
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NHWC")
        if grid:  # timm's features_only wrapper: the blocks' maps, the head and norm pruned
            features = timm.create_model(name, seq_len=64, depth=3, embed_dim=8, features_only=True, out_indices=(0, 2))
            assert features.feature_info.channels() == [8, 8] and features.feature_info.reduction() == [1, 1]
            assert [tuple(f.shape) for f in features.eval()(x)] == [(2, 8, 8, 8)] * 2


def test_fx_traced_sequence_model_matches_with_and_without_lengths():
    """MRConv layers and the input checks are leaves of timm's FX traces; padding masks may be None at run time."""
    from timm.models import create_feature_extractor, get_graph_node_names

    model = small_model()
    randomize_model_(model)
    model.eval()
    out = get_graph_node_names(model)[1][-1]
    traced = create_feature_extractor(model, return_nodes=[out])
    tokens, lengths = torch.randint(1, 11, (2, 48)), torch.tensor([48, 20])
    with torch.no_grad():
        torch.testing.assert_close(traced(tokens)[out], model(tokens))
        torch.testing.assert_close(traced(tokens, lengths)[out], model(tokens, lengths))
