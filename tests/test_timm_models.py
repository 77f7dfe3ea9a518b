"""timm's own model tests (``tests/test_models.py`` of the installed timm's sdist) on ``mrconvnext_atto`` and
``mrconv_pathfinder_base``: forward, backward, default cfgs, ``features_only``, FX forward and backward.

The file is not in timm's wheel: it is taken from the sdist on PyPI (``pip download``) into a cache folder,
and the test skips if that fails (offline). The plugin ``tests/timm_test_models.py`` selects the two models.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

ROOT = Path(__file__).resolve().parents[1]
PASSED = [  # every test of timm's file that applies to the two models
    *(f"test_model_{test}[{batch}-{model}]" for test, batch in (("forward", 1), ("backward", 2), ("forward_fx", 1),
      ("backward_fx", 2), ("forward_features", 1)) for model in ("mrconvnext_atto", "mrconv_pathfinder_base")),
    "test_model_default_cfgs[1-mrconvnext_atto.untrained]",
]  # fmt: skip


def _timm_test_file() -> Path:
    """``tests/test_models.py`` of the installed timm version, from its sdist (cached)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mrconvnext" / f"timm-{timm.__version__}"
    target = cache / "test_models.py"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={timm.__version__}", "--no-binary", ":all:", "--no-deps"]
    proc = subprocess.run([*cmd, "-d", str(cache), "-q"], capture_output=True, text=True, timeout=300)
    sdists = list(cache.glob("timm-*.tar.gz"))
    if proc.returncode or not sdists:
        pytest.skip(f"cannot download the timm {timm.__version__} sdist from PyPI: {proc.stderr.strip()[-300:]}")
    with tarfile.open(sdists[0]) as archive:
        member = archive.getmember(f"timm-{timm.__version__}/tests/test_models.py")
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(archive.extractfile(member).read())
        tmp.rename(target)
    return target


def test_timm_model_tests_pass() -> None:
    test_file = _timm_test_file()
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-c", os.devnull, "-p", "tests.timm_test_models"]
    cmd += ["-p", "no:cacheprovider", "-q", "-rA", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=test_file.parent, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    passed = set(re.findall(r"^PASSED \S+::(\S+)", out, re.MULTILINE))
    assert passed == set(PASSED), out
    skipped = re.findall(r"^SKIPPED \[(\d+)\] \S+: (.*)$", out, re.MULTILINE)  # grouped by reason and line
    assert sum(int(n) for n, _ in skipped) == 5, out  # TorchScript (4), default cfgs of the sequence model (1)
    assert all("TorchScript" in reason or "1D sequence" in reason for _, reason in skipped), out
