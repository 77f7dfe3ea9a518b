"""The package as pip installs it: a quiet build, and ``python -m mrconvnext.demo`` away from the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "mrconvnext", "train_imagenet.py", "train_sequence.py", "validate.py")


def test_installed_demo_runs_outside_the_repository(tmp_path) -> None:
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "--target", str(site), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "deprecated" not in (build.stdout + build.stderr).lower(), build.stdout + build.stderr

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mrconvnext, train_imagenet, train_sequence as s, validate as v; "
            "print(mrconvnext.__file__, train_imagenet.__file__, s.__file__, v.__file__)",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(Path(path).is_relative_to(site) for path in where.stdout.split()), where.stdout
    demo = subprocess.run(
        [sys.executable, "-m", "mrconvnext.demo", "--epochs", "1"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "top-1 difference train vs deploy" in demo.stdout
    assert (workdir / "demo_output" / "train" / "model_best.pth").is_file()
    assert not (site / "demo_output").exists()
