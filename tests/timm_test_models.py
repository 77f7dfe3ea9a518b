"""pytest plugin for running timm's own ``tests/test_models.py`` on this project's models (``-p tests.timm_test_models``).

Importing it registers the models with timm. It keeps the test items of :data:`MODELS` only (timm's file
parametrizes every registered model) and marks as skipped, with the reason, the ones that cannot apply.
tests/test_timm_models.py runs it on the file from the sdist of the installed timm version.
"""

from __future__ import annotations

import pytest

import mrconvnext  # noqa: F401  (registers the models with timm)

MODELS = ("mrconvnext_atto", "mrconv_pathfinder_base")  # an MRConvNeXt, and a sequence model taking images
NO_TORCHSCRIPT = (
    "TorchScript cannot compile MRConv (FFT spectra cached in Python, a custom autograd Function): export ONNX with "
    "python -m mrconvnext.export --format onnx or timm's onnx_export(..., use_dynamo=True)"
)
SKIPS = {"test_model_forward_torchscript": NO_TORCHSCRIPT, "test_model_forward_fx_torchscript": NO_TORCHSCRIPT}
SEQUENCE_SKIPS = {
    "test_model_default_cfgs": (
        "timm's test asserts 2-D feature maps from forward_features ('TODO add 1D sequence support'); sequence "
        "models return (B, L, D)"
    ),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        model = str(params.get("model_name", "")).split(".")[0]  # default-cfg tests name models with their tag
        if model not in MODELS:
            drop.append(item)
            continue
        test = getattr(item, "originalname", item.name)
        reason = SKIPS.get(test) or (SEQUENCE_SKIPS.get(test) if model.startswith("mrconv_") else None)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
        keep.append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
