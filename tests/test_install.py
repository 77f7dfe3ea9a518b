"""The package as pip installs it: a quiet wheel build that ships ``mrconvnext`` only, and ``python -m mrconvnext.demo``
away from the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "mrconvnext", "train_imagenet.py", "train_sequence.py", "validate.py")


def test_wheel_ships_only_the_package_and_its_demo_runs_outside_the_repository(tmp_path) -> None:
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "deprecated" not in (build.stdout + build.stderr).lower(), build.stdout + build.stderr
    (wheel,) = wheels.glob("mrconvnext-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist() if ".dist-info/" not in name}
    assert top_level == {"mrconvnext"}, f"the wheel installs more than the package: {sorted(top_level)}"

    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = subprocess.run(
        [sys.executable, "-c", "import mrconvnext.train_imagenet as t; print(t.__file__)"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
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
