"""Pretrained-weight pipeline, offline: local files, training checkpoints, export, local-dir, hf-hub cache, torch.hub."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import timm.models._hub
import torch

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext.export import export_model, main
from mrconvnext.models.mrconvnext import MRConvNeXt, checkpoint_filter_fn
from mrconvnext.utils.checkpoint import checkpoint_record, save_checkpoint_file

from .reference import rel_err
from .test_mrconvnext import _randomize_model_

REPO = Path(__file__).resolve().parents[1]
NAME, SIZE = "mrconvnext_atto", 64
IMAGES = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


class _NotATensor:
    """An arbitrary object: a weights_only load must refuse to unpickle it."""


@pytest.fixture(scope="module")
def trained() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A train-form state dict with random non-trivial weights and BN statistics, and its eval logits."""
    model = timm.create_model(NAME, img_size=SIZE).eval()
    _randomize_model_(model, seed=3)
    with torch.no_grad():
        return {k: v.clone() for k, v in model.state_dict().items()}, model(IMAGES)


@pytest.fixture(scope="module")
def deployed(trained) -> dict[str, torch.Tensor]:
    model = timm.create_model(NAME, img_size=SIZE)
    model.load_state_dict(trained[0])
    model.reparameterize()
    return model.state_dict()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network: huggingface_hub reads HF_HUB_OFFLINE at import, so patch the constant; empty cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf-cache"


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IMAGES)


def _prefixed(state_dict: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state_dict.items()}


# pretrained tags whose weights exist (name: where); a tag added to the registry must be added here
PUBLISHED: dict[str, str] = {}


def test_only_published_weights_are_advertised() -> None:
    assert timm.list_pretrained("mrconv*") == sorted(PUBLISHED)
    for name in timm.list_models("mrconv*"):
        assert timm.is_model_pretrained(name) == any(p.startswith(f"{name}.") for p in PUBLISHED), name


def test_missing_weights_error_comes_without_hub_access(monkeypatch, offline_hub) -> None:
    def no_hub(*args, **kwargs):
        raise AssertionError(f"the hub was contacted: {args}")

    with monkeypatch.context() as patch, pytest.raises(RuntimeError) as info:
        patch.setattr(timm.models._hub, "hf_hub_download", no_hub)
        patch.setattr(huggingface_hub, "hf_hub_download", no_hub)
        timm.create_model(NAME, pretrained=True, img_size=SIZE)
    message = str(info.value)
    assert f"No pretrained weights exist for {NAME}.untrained" in message
    assert "no MRConvNeXt ImageNet weights are published" in message
    assert "pretrained_cfg_overlay=dict(file=" in message and "local-dir:" in message
    assert "checkpoint_path=" in message

    with pytest.raises(RuntimeError, match="from file '/no/such/weights.safetensors'"):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file="/no/such/weights.safetensors"))
    # a Hub id that is not in the cache, offline: named with the cache it looked in
    with pytest.raises(RuntimeError, match=f"Hugging Face Hub repo 'org/none' \\(cache {offline_hub}\\)"):
        timm.create_model(
            NAME, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id="org/none"), cache_dir=offline_hub
        )


def test_safetensors_file(tmp_path, trained) -> None:
    state_dict, logits = trained
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(state_dict, path)
    model = timm.create_model(NAME, img_size=SIZE, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(_logits(model), logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "layout,prefix,deploy_source,deploy_model",
    [
        ("bare", "", False, False),
        ("state_dict", "module.", False, False),
        ("state_dict_ema", "_orig_mod.", False, True),  # train form folded on load into a deploy model
        ("model", "_orig_mod.module.", False, True),
        ("state_dict", "", True, True),
    ],
)
def test_training_checkpoint(tmp_path, trained, deployed, layout, prefix, deploy_source, deploy_model) -> None:
    state_dict, logits = trained
    weights = _prefixed(deployed if deploy_source else state_dict, prefix)
    if layout == "bare":
        checkpoint = weights
    else:
        checkpoint = {"epoch": 3, "arch": NAME, "args": argparse.Namespace(lr=0.1), layout: weights}
        if layout == "state_dict_ema":  # EMA weights win over the plain ones, as in timm
            checkpoint["state_dict"] = {k: torch.zeros_like(v) for k, v in weights.items()}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    model = timm.create_model(
        NAME, img_size=SIZE, deploy=deploy_model, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert model.deploy == deploy_model
    assert rel_err(_logits(model), logits) < 1e-4


def test_checkpoint_path_same_form(tmp_path, deployed, trained) -> None:
    path = tmp_path / "deploy.pth"
    torch.save({"state_dict": deployed}, path)
    model = timm.create_model(NAME, img_size=SIZE, deploy=True, checkpoint_path=str(path))
    assert rel_err(_logits(model), trained[1]) < 1e-4


def test_checkpoints_are_not_unpickled(tmp_path, trained) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": trained[0], "payload": _NotATensor()}, path)
    with pytest.raises(RuntimeError, match="weights_only=True blocked"):
        timm.create_model(NAME, img_size=SIZE, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_num_classes_and_in_chans_adapt_head_and_stem(tmp_path, trained) -> None:
    state_dict = trained[0]
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(state_dict, path)
    model = timm.create_model(
        NAME, img_size=SIZE, num_classes=5, in_chans=1, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    loaded = model.state_dict()
    assert loaded["head.fc.weight"].shape == (5, 320)
    torch.testing.assert_close(loaded["stem.0.weight"], state_dict["stem.0.weight"].sum(dim=1, keepdim=True))
    for key, value in state_dict.items():
        if not key.startswith(("head.fc.", "stem.0.weight")):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert model(torch.randn(1, 1, SIZE, SIZE)).shape == (1, 5)

    # a checkpoint with its own class count keeps its head when the cfg says so, and is rejected clearly otherwise
    head10 = dict(state_dict, **{"head.fc.weight": torch.randn(10, 320), "head.fc.bias": torch.randn(10)})
    safetensors.torch.save_file(head10, path)
    overlay = dict(file=str(path), num_classes=10)
    model = timm.create_model(NAME, img_size=SIZE, pretrained=True, pretrained_cfg_overlay=overlay)
    assert model.num_classes == 10 and torch.equal(model.head.fc.weight, head10["head.fc.weight"])
    with pytest.raises(
        RuntimeError, match=r"head\.fc\.weight: checkpoint \(10, 320\) vs model \(1000, 320\).*num_classes=N"
    ):
        timm.create_model(NAME, img_size=SIZE, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_incompatible_checkpoints_are_rejected_with_keys_and_shapes(trained, deployed) -> None:
    atto = timm.create_model(NAME, img_size=SIZE)
    tiny = timm.create_model("mrconvnext_tiny", img_size=SIZE, device="meta")
    with pytest.raises(RuntimeError, match=r"shape mismatch: .*stem\.0\.weight: checkpoint \(96, 3, 4, 4\) vs model"):
        checkpoint_filter_fn({k: torch.empty(v.shape) for k, v in tiny.state_dict().items()}, atto)

    nano_layout = dict(trained[0])  # one block more in stage 2 than atto
    nano_layout.update({k.replace("blocks.5.", "blocks.6."): v for k, v in trained[0].items() if ".blocks.5." in k})
    with pytest.raises(RuntimeError, match=r"unexpected: stages\.2\.blocks\.6\."):
        checkpoint_filter_fn({"state_dict": nano_layout}, atto)

    missing = {k: v for k, v in trained[0].items() if not k.startswith("stages.3.blocks.1.mlp")}
    with pytest.raises(RuntimeError, match=r"missing: stages\.3\.blocks\.1\.mlp\.fc1\.weight"):
        checkpoint_filter_fn(missing, atto)

    with pytest.raises(RuntimeError, match="create the model with deploy=True"):
        checkpoint_filter_fn(deployed, atto)

    convnext = timm.create_model("convnext_nano").state_dict()  # ConvNeXt weights convert into their own size only
    with pytest.raises(ValueError, match=r"does not match mrconvnext_atto") as info:
        checkpoint_filter_fn(convnext, atto)
    assert "deploy=True" not in str(info.value)


def test_export_then_local_dir(tmp_path, trained, capsys) -> None:
    state_dict, logits = trained
    checkpoint = tmp_path / "train.pth"
    torch.save({"state_dict": _prefixed(state_dict, "module."), "epoch": 1}, checkpoint)
    out = tmp_path / "deploy"
    main(
        ["--model", NAME, "--checkpoint", str(checkpoint), "--output", str(out)]
    )  # a bare checkpoint: size from shapes
    assert "relative difference" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no temporary leftovers
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == NAME and config["model_args"]["deploy"] is True
    assert config["model_args"]["img_size"] == [SIZE, SIZE] and config["num_classes"] == 1000
    assert config["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]

    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.deploy and all(m.deploy for m in model.modules() if isinstance(m, mrconvnext.MRConv))
    assert rel_err(_logits(model), logits) < 1e-4
    assert model.state_dict().keys() == safetensors.torch.load_file(out / "model.safetensors").keys()


def test_export_rejects_a_mismatched_checkpoint(tmp_path, trained) -> None:
    checkpoint = tmp_path / "train.safetensors"
    safetensors.torch.save_file(trained[0], checkpoint)
    with pytest.raises(ValueError, match="does not fit mrconvnext_nano"):
        export_model(checkpoint, tmp_path / "out", "mrconvnext_nano", img_size=SIZE)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="'resnet18' is not an MRConv model"):
        export_model(checkpoint, tmp_path / "out", "resnet18")


_HUB_SCRIPT = """
import sys, timm, torch, mrconvnext
for name, kwargs, images, expected in torch.load(sys.argv[1]):
    model = timm.create_model(name, pretrained=True, **kwargs).eval()
    with torch.no_grad():
        err = ((model(images) - expected).norm() / expected.norm()).item()
    assert model.deploy and err < 1e-4, (name, err)
    print(name, 'ok', err)
"""


def _add_to_hf_cache(cache: Path, repo_id: str, files: Path) -> None:
    """The layout of huggingface_hub's cache: ``snapshots/<commit>/`` files, ``refs/main`` names the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hf_hub_ids_resolve_from_offline_cache(tmp_path, trained) -> None:
    """An ``hf-hub:`` id and a default cfg's hf_hub_id load from a local cache with HF_HUB_OFFLINE=1."""
    state_dict, logits = trained
    checkpoint = tmp_path / "train.pth"
    torch.save({"state_dict": state_dict}, checkpoint)
    export_model(checkpoint, tmp_path / "deploy", NAME, img_size=SIZE)
    cache = tmp_path / "hub"
    _add_to_hf_cache(cache, "mrconvnext-test/atto-deploy", tmp_path / "deploy")

    # a cfg's hf_hub_id naming a repo of train-form weights (fine-tunable); deploy=True folds them on load
    export_model(checkpoint, tmp_path / "train", NAME, img_size=SIZE, deploy=False)
    train_repo = "mrconvnext-test/atto-train"
    _add_to_hf_cache(cache, train_repo, tmp_path / "train")

    payload = tmp_path / "payload.pt"
    torch.save(
        [
            ("hf-hub:mrconvnext-test/atto-deploy", {}, IMAGES, logits),
            (
                NAME,
                {"deploy": True, "img_size": SIZE, "pretrained_cfg_overlay": {"hf_hub_id": train_repo}},
                IMAGES,
                logits,
            ),
        ],
        payload,
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, str(payload)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok ") == 2


def test_torch_hub_local(offline_hub) -> None:
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entry_points = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and n.startswith("mrconv")}
    assert entry_points == set(hubconf.MODEL_NAMES) and set(timm.list_models("mrconvnext*")) <= entry_points
    assert hubconf.mrconvnext_atto.__doc__ == "timm.create_model('mrconvnext_atto', pretrained=pretrained, **kwargs)"

    model = torch.hub.load(str(REPO), "mrconvnext_tiny", source="local", pretrained=False, img_size=SIZE)
    assert isinstance(model, MRConvNeXt) and not model.deploy
    assert model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 1000)
    deploy = torch.hub.load(str(REPO), "mrconvnext_atto", source="local", deploy=True, num_classes=3, img_size=SIZE)
    assert deploy.deploy and deploy.num_classes == 3
    with pytest.raises(RuntimeError, match="no MRConvNeXt ImageNet weights are published"):
        torch.hub.load(str(REPO), "mrconvnext_atto", source="local", pretrained=True, cache_dir=offline_hub)


def _readme_command(prefix: str) -> list[str]:
    """The README's command starting with ``prefix`` (inline code), split as a shell would."""
    readme = (REPO / "README.md").read_text()
    commands = [c for c in re.findall(r"`([^`\n]+)`", readme) if c.startswith(prefix)]
    assert commands, f"README shows no `{prefix} ...` command"
    return shlex.split(commands[0])


def test_readme_export_command_on_a_non_224_checkpoint(tmp_path) -> None:
    """The README's export command as written, on a training checkpoint of another size: the size it records is used."""
    command = _readme_command("python -m mrconvnext.export --checkpoint")
    checkpoint, output = command[command.index("--checkpoint") + 1], command[command.index("--output") + 1]
    model = timm.create_model(NAME, img_size=SIZE, num_classes=5).eval()
    _randomize_model_(model, seed=4)
    state = model.state_dict()
    save_checkpoint_file(checkpoint_record(model, state_dict_ema=state), tmp_path / checkpoint)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "relative difference" in result.stdout
    deployed = timm.create_model(f"local-dir:{tmp_path / output}", pretrained=True).eval()
    assert deployed.deploy and deployed.img_size == (SIZE, SIZE) and deployed.num_classes == 5
    images = torch.randn(2, 3, SIZE, SIZE)
    assert rel_err(_logits_of(deployed, images), _logits_of(model, images)) < 1e-4


def _logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def test_size_mismatch_error_names_img_size(trained) -> None:
    model = timm.create_model(NAME)  # planned for 224, the checkpoint for 64
    with pytest.raises(
        RuntimeError, match=r"planned for img_size=64, this model's for img_size=224: create it with img_size=64"
    ):
        checkpoint_filter_fn(trained[0], model)
