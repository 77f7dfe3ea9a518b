"""The package as pip installs it, in a fresh virtual environment: a quiet wheel build that ships ``mrconvnext``
and its LICENSE only; ``python -m mrconvnext.demo`` run from it, away from the repository and without the optional
extras (matplotlib, onnx), end to end; the tools naming the extra they miss; the demo's number reproduced from its
export folder by timm alone; and the Makefile's choice of torch wheels.

The fresh environment is ``python -m venv`` (no packages), the wheel installed into it with ``--no-deps``, and, on
its path through a ``.pth`` file, links to the distributions the wheel's core requirements need (transitively, with
their markers) taken from this interpreter's environment: torch is not downloaded again, and nothing an extra or
the dev tools brought in (matplotlib, onnx, pytest, ...) is there, so an import the requirements do not declare
fails here as it would for a user.
"""

from __future__ import annotations

import csv
import email
import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from timm.data import ImageDataset, create_transform, resolve_data_config

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "mrconvnext", "train_imagenet.py", "train_sequence.py")
EXTRA_MODULES = ("matplotlib", "onnx", "onnxscript", "onnxruntime")  # the plot and export extras


def _run(args: list[str], timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def _core_distributions(wheel: Path) -> list[importlib.metadata.Distribution]:
    """The installed distributions the wheel's requirements without extras need, transitively."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_string(archive.read(name).decode())
    pending = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    found: dict[str, importlib.metadata.Distribution] = {}
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = canonicalize_name(requirement.name)
        if key in found:
            continue
        found[key] = importlib.metadata.distribution(requirement.name)
        pending.extend(Requirement(r) for r in found[key].requires or [])
    return list(found.values())


def _link_site(distributions: list[importlib.metadata.Distribution], site: Path) -> None:
    """``site/<top-level entry>`` links to every top-level package, module and dist-info of ``distributions``."""
    site.mkdir()
    for dist in distributions:
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or top.endswith(".pth") or (site / top).exists():
                continue
            (site / top).symlink_to(Path(dist.locate_file(top)).resolve())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: the build writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp), "."],
        cwd=source,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "deprecated" not in (build.stdout + build.stderr).lower(), build.stdout + build.stderr
    (path,) = tmp.glob("mrconvnext-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_python(wheel, tmp_path_factory) -> Path:
    """The python of a fresh venv holding the wheel and the core requirements only."""
    tmp = tmp_path_factory.mktemp("venv")
    env = tmp / "env"
    created = _run([sys.executable, "-m", "venv", "--without-pip", str(env)])
    assert created.returncode == 0, created.stderr
    python = env / "bin" / "python"
    installed = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)])
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    _link_site(_core_distributions(wheel), tmp / "core")
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    (Path(purelib) / "core_requirements.pth").write_text(f"import site; site.addsitedir({str(tmp / 'core')!r})\n")
    return python


def _fresh_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return dict(env, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def demo(fresh_python, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``python -m mrconvnext.demo --epochs 1`` with the installed package, in a folder outside the repository."""
    workdir = tmp_path_factory.mktemp("elsewhere")
    result = _run(
        [str(fresh_python), "-m", "mrconvnext.demo", "--epochs", "1"], cwd=workdir, env=_fresh_env(), timeout=900
    )
    return workdir / "demo_output", result


def test_wheel_ships_the_package_and_its_license_only(wheel) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"mrconvnext"}, f"the wheel installs more than the package: {sorted(top_level)}"
    license_file = next((n for n in names if n.endswith(".dist-info/licenses/LICENSE")), None)
    assert license_file, f"no LICENSE in the wheel: {[n for n in names if '.dist-info/' in n]}"
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(license_file).decode()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_fresh_environment_has_the_package_and_no_extra(fresh_python, tmp_path) -> None:
    probe = "import importlib.util, mrconvnext; print(mrconvnext.__file__); "
    probe += f"print([m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m)])"
    result = _run([str(fresh_python), "-c", probe], cwd=tmp_path, env=_fresh_env())
    assert result.returncode == 0, result.stderr[-3000:]
    where, extras = result.stdout.splitlines()
    assert Path(where).is_relative_to(fresh_python.parents[1]), where  # the installed copy, not the repository's
    assert extras == "[]", f"the fresh environment should lack the extras' modules, has {extras}"


def test_installed_demo_passes_without_matplotlib(demo) -> None:
    output, result = demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "top-1 difference train vs deploy" in result.stdout
    assert (output / "train" / "model_best.pth").is_file()
    assert "plots skipped: matplotlib is not installed" in result.stdout
    assert "pip install '.[plot]'" in result.stdout  # the extra, as a clone installs it
    assert not (output / "plots").exists()


def test_installed_tools_name_the_extra_they_need(demo, fresh_python, tmp_path) -> None:
    checkpoint = demo[0] / "train" / "model_best.pth"
    commands = {
        "[plot]": ["-m", "mrconvnext.plot", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "plots")],
        "[export]": ["-m", "mrconvnext.export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "onnx")],
    }
    commands["[export]"] += ["--format", "onnx"]
    for extra, args in commands.items():
        result = _run([str(fresh_python), *args], cwd=tmp_path, env=_fresh_env())
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"pip install '.{extra}'" in result.stderr, result.stderr


def test_exported_demo_model_evaluates_as_training_printed(demo, tmp_path, capsys) -> None:
    """The number a user gets from the export folder with timm's default data config and transform equals the one
    training printed (summary.csv) and validate.py reported: crop, interpolation, mean/std and size travel along."""
    output, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output / "train" / "summary.csv", newline="") as f:
        trained = float(list(csv.DictReader(f))[-1]["eval_top1"])
    # float rounding may flip a borderline image; another crop moves many (crop 0.875: 51.00 instead of 44.00)
    one_image = 100.0 / 400
    validated = json.loads((output / "train" / "validate_train.json").read_text())[-1]
    assert validated["top1"] == pytest.approx(trained, abs=one_image) and validated["crop_pct"] == 1.0

    deploy = tmp_path / "deploy"
    assert export_main(["--checkpoint", str(output / "train" / "model_best.pth"), "--output", str(deploy)]) == 0
    config = json.loads((deploy / "config.json").read_text())
    assert config["pretrained_cfg"]["crop_pct"] == 1.0 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((deploy / name).stat().st_mode) == 0o666 & ~_umask(), name

    model = timm.create_model(f"local-dir:{deploy}", pretrained=True).eval()
    data_config = resolve_data_config(model=model)  # what a timm user does, with no flag
    dataset = ImageDataset(str(output / "shapes" / "val"), transform=create_transform(**data_config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=100)
    correct = 0
    with torch.no_grad():
        for images, targets in loader:
            correct += (model(images).argmax(dim=1) == targets).sum().item()
    assert len(dataset) == 400 and 100.0 * correct / len(dataset) == pytest.approx(trained, abs=one_image)


def test_plot_reads_the_demo_checkpoint_and_its_export(demo, tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    from mrconvnext.plot import main as plot_main

    checkpoint = demo[0] / "train" / "model_best.pth"
    deploy = tmp_path / "deploy"
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(deploy)]) == 0
    for source in (checkpoint, deploy, deploy / "model.safetensors"):
        out = tmp_path / f"plots_{source.name}"
        assert plot_main(["--checkpoint", str(source), "--out", str(out), "--plots", "kernels_1d"]) == 0, source
        assert (out / "kernels_1d.png").is_file()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ Makefile: torch wheels


def _fake_nvidia_smi(folder: Path, status: int) -> dict[str, str]:
    """An environment whose ``nvidia-smi`` exits with ``status`` (0: a GPU is visible), pip reading no config."""
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nexit {status}\n")
    tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return dict(env, PATH=f"{folder}{os.pathsep}{os.environ['PATH']}", PIP_CONFIG_FILE=os.devnull)


def test_makefile_prefers_cpu_torch_without_a_gpu_and_falls_back(tmp_path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0  # with pip (ensurepip, offline)
    unreachable = "http://127.0.0.1:9/simple"  # the discard port: connection refused at once
    make = ["make", "--no-print-directory", "-C", str(ROOT), "cpu-torch", f"PY={venv / 'bin' / 'python'}"]
    make.append(f"TORCH_CPU_INDEX={unreachable}")

    no_gpu = _run(make, env=_fake_nvidia_smi(tmp_path / "no_gpu", 1), timeout=300)
    assert no_gpu.returncode == 0, no_gpu.stdout + no_gpu.stderr
    if sys.platform.startswith("linux"):
        assert f"no NVIDIA GPU visible: trying CPU-only torch from {unreachable}" in no_gpu.stdout
        assert f"{unreachable} could not be used; pip installs torch from PyPI" in no_gpu.stdout
    assert _run([str(venv / "bin" / "python"), "-c", "import torch"]).returncode != 0  # nothing half-installed

    gpu = _run(make, env=_fake_nvidia_smi(tmp_path / "gpu", 0), timeout=300)
    assert gpu.returncode == 0, gpu.stdout + gpu.stderr
    assert "torch from PyPI" in gpu.stdout and unreachable not in gpu.stdout


def _wheel(folder: Path, name: str, init: str) -> None:
    """A pure-Python wheel of ``name`` 99.0 whose package runs ``init`` on import, in a PEP 503 index ``folder``."""
    tag = f"{name}-99.0"
    files = {
        f"{name}/__init__.py": init,
        f"{tag}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 99.0\n",
        f"{tag}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{tag}.dist-info/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{tag}.dist-info/RECORD"])
    (folder / name).mkdir(parents=True)
    with zipfile.ZipFile(folder / name / f"{tag}-py3-none-any.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    (folder / name / "index.html").write_text(f'<a href="{tag}-py3-none-any.whl">{tag}-py3-none-any.whl</a>\n')


def test_makefile_rejects_a_cpu_torch_whose_torchvision_does_not_import(tmp_path) -> None:
    """An index that pairs a CPU torch with a torchvision built for another torch (as pip's find-links did on CI:
    ``operator torchvision::nms does not exist``) is not a usable CPU torch: both are removed and PyPI's are used."""
    if shutil.which("make") is None or not sys.platform.startswith("linux"):
        pytest.skip("the CPU-only index is tried on Linux with make")
    index = tmp_path / "simple"
    _wheel(index, "torch", "__version__ = '99.0+cpu'\nclass version:\n    cuda = None\n")
    _wheel(index, "torchvision", "raise RuntimeError('operator torchvision::nms does not exist')\n")
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    make = ["make", "--no-print-directory", "-C", str(ROOT), "cpu-torch", f"PY={venv / 'bin' / 'python'}"]
    result = _run([*make, f"TORCH_CPU_INDEX={index.as_uri()}"], env=_fake_nvidia_smi(tmp_path / "no_gpu", 1))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{index.as_uri()} could not be used; pip installs torch from PyPI" in result.stdout
    assert "CPU-only" not in result.stdout.replace("trying CPU-only", "")
    assert _run([str(venv / "bin" / "python"), "-c", "import torch"]).returncode != 0  # nothing half-installed
