"""State dicts written before the layer's internals were reorganised still load and give the same outputs.

``fixtures/mrconv_checkpoints.pt`` was written by ``fixtures/make_mrconv_checkpoints.py`` at commit
6048bf3: per configuration the train-form and deploy-form state dicts, inputs and the outputs of that
code (float32), plus one train-mode step with its running-statistics update.
"""

from pathlib import Path

import pytest
import torch

from mrconvnext import MRConv, MRConv2d

from .reference import rel_err

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "mrconv_checkpoints.pt", weights_only=True)
CLASSES = {"MRConv": MRConv, "MRConv2d": MRConv2d}
LEGACY_OPTIONS = {"norm": "branch_norm"}  # the fixture's construction options by their names at the time
EVAL_CASES = sorted(name for name, entry in FIXTURE.items() if "deploy_state" in entry)


def options(entry):
    return {LEGACY_OPTIONS.get(k, k): v for k, v in entry["options"].items()}


def build(entry, deploy=False):
    return CLASSES[entry["cls"]](*entry["args"], **options(entry), deploy=deploy)


def test_fixture_covers_every_kernel_type_and_form():
    cases = [options(FIXTURE[name]) for name in EVAL_CASES]
    assert {o["kernel_type"] for o in cases} == {"dense", "dilated", "fourier", "sparse", "fourier_sparse"}
    assert {o.get("combine", "sum") for o in cases} == {"sum", "concat"}
    assert {o.get("branch_norm", "batch") for o in cases} == {"batch", "scale"}


@pytest.mark.parametrize("name", EVAL_CASES)
def test_train_form_checkpoint_loads_and_matches(name):
    entry = FIXTURE[name]
    layer = build(entry)
    layer.load_state_dict(entry["train_state"], strict=True)
    layer.eval()
    with torch.no_grad():
        assert rel_err(layer(entry["x"]), entry["expected"]) < 1e-5
        if "x_short" in entry:
            assert rel_err(layer(entry["x_short"]), entry["expected_short"]) < 1e-5
        layer.reparameterize()
        assert layer.state_dict().keys() == entry["deploy_state"].keys()
        for key, value in layer.state_dict().items():
            torch.testing.assert_close(value, entry["deploy_state"][key], rtol=1e-5, atol=1e-6, msg=key)
        assert rel_err(layer(entry["x"]), entry["expected_deploy"]) < 1e-5


@pytest.mark.parametrize("name", EVAL_CASES)
def test_deploy_form_checkpoint_loads_and_matches(name):
    entry = FIXTURE[name]
    layer = build(entry, deploy=True).eval()
    layer.load_state_dict(entry["deploy_state"], strict=True)
    with torch.no_grad():
        assert rel_err(layer(entry["x"]), entry["expected_deploy"]) < 1e-5


def test_train_step_and_running_statistics_match():
    entry = FIXTURE["train_step_fourier_sparse_bi"]
    layer = build(entry)
    layer.load_state_dict(entry["train_state"], strict=True)
    with torch.no_grad():
        assert rel_err(layer.train()(entry["x"]), entry["expected"]) < 1e-5
    after = layer.state_dict()
    assert after.keys() == entry["state_after"].keys()
    for key, value in entry["state_after"].items():
        torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-6, msg=key)
