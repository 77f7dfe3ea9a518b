"""README.md as documentation that runs: every ```python block as written, every shell command accounted for.

Python blocks are found by parsing README.md, so a block added in any section is picked up without touching
this file; a block preceded by the line ``<!-- doctest: slow -->`` runs with the slow tests (``make test-slow``)
only. Each runs in its own process, in a working directory holding the files the README names as
placeholders (``ckpt.pth``, ``deploy_dir/``, ``output/train/RUN/model_best.pth``, a local Hub cache with
``org/repo``), made here; ``path/to/mrconvnext`` is replaced by the repository root.

Shell commands are those of ```bash / ```sh / ```console blocks (``$`` lines in console blocks) and inline
code that starts with a program (``python``, ``make``, ``torchrun``, ...). Each must match an entry of
``COMMANDS``: either it is run here as written (cheap ones, in the prepared directory), or it names the tests
that run the same program with the same flags on tiny data. A README command without an entry fails
``test_every_readme_command_is_exercised`` with the command to add.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import mrconvnext  # noqa: F401  (registers the models)
from mrconvnext.demo import make_shapes_dataset
from mrconvnext.export import export_model
from mrconvnext.utils.checkpoint import checkpoint_record, save_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PLACEHOLDERS = {"path/to/mrconvnext": str(ROOT)}
SLOW_MARK = "<!-- doctest: slow -->"
SHELL_LANGS = ("bash", "sh", "shell", "console")
PROGRAMS = ("python", "python3", ".venv/bin/python", "make", "torchrun", "accelerate", "hf", "pip")


def _blocks(text: str) -> list[tuple[int, str, str, bool]]:
    """``(line number, language, body, marked slow)`` of every fenced code block."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        match = re.match(r"^(\s*)```(\w*)\s*$", lines[index])
        if match:
            indent, lang, start = match.group(1), match.group(2), index + 1
            previous = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
            index += 1
            while index < len(lines) and lines[index].strip() != "```":
                index += 1
            body = "\n".join(line[len(indent) :] for line in lines[start:index])
            blocks.append((start, lang, body, previous == SLOW_MARK))
        index += 1
    return blocks


def python_blocks() -> list[tuple[int, str, bool]]:
    return [(line, body, slow) for line, lang, body, slow in _blocks(README.read_text()) if lang == "python"]


def _without_env(command: str) -> str:
    """A command without its leading ``VAR=value`` assignments."""
    return re.sub(r"""^(\s*[A-Z_][A-Z0-9_]*=("[^"]*"|'[^']*'|[^\s"']*)\s+)*""", "", command).strip()


def shell_commands() -> list[str]:
    """Every shell command README.md shows (continuation lines joined, comments and console output dropped)."""
    text = README.read_text()
    commands = []
    for _, lang, body, _ in _blocks(text):
        if lang not in SHELL_LANGS:
            continue
        joined = re.sub(r"\\\n\s*", "", body)
        for line in joined.splitlines():
            line = line.strip()
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            line = line.split(" #")[0].strip() if not line.startswith("#") else ""
            if line:
                commands.append(line)
    fenced = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", fenced):
        words = _without_env(span).split()
        if len(words) > 1 and words[0] in PROGRAMS:
            commands.append(span.strip())
    return commands


# README command (regex, matched against the start of the command with env assignments removed) -> where it
# runs: "here" (run as written by test_readme_command_runs), "suite" (the test suite itself), or test node ids
# that run that program with the same flags on tiny data.
COMMANDS: dict[str, str | tuple[str, ...]] = {
    r"make demo$": (
        "tests/test_install.py::test_installed_demo_passes_without_matplotlib",
        "tests/test_install.py::test_plot_reads_the_demo_checkpoint_and_its_export",
    ),
    r"make (test|test-slow|lint|format)\b": "suite",
    r"make selfcheck": ("tests/test_readme.py::test_selfcheck_runs",),
    r"make benchmark": ("tests/test_readme.py::test_benchmark_script_runs",),
    r"python -m mrconvnext\.<tool>$": "not run: the pattern of the tools' commands, full commands below",
    r"python -m mrconvnext\.export --checkpoint ckpt\.pth --output deploy_dir/?$": (
        "tests/test_pretrained.py::test_readme_export_command_on_a_non_224_checkpoint",
    ),
    r"python -m mrconvnext\.(demo|train_imagenet|validate)$": (
        "tests/test_install.py::test_installed_demo_passes_without_matplotlib",
    ),
    r"hf upload ": "not run: uploads to the Hugging Face Hub (no network here)",
    r"hf download \S+ --repo-type dataset --local-dir ": "not run: downloads from the Hugging Face Hub (no network here)",
    r"accelerate config$": "not run: accelerate's interactive configuration",
    r"(accelerate launch|torchrun --nproc_per_node \d+)$": "not run: a program named in prose, full commands above",
    r"torchrun \.\.\.$": "not run: environment variables for the torchrun commands above",
    r"\.venv/bin/python -c ": "here",
    r"(accelerate launch|torchrun --nproc_per_node \d+|torchrun --nnodes \d+ .*) train_imagenet\.py --data-dir": (
        "tests/test_train.py::test_two_process_run",
        "tests/test_train.py::test_resume_after_kill_matches_uninterrupted",
        "tests/test_recipe.py::test_default_recipe_trains",
        "tests/test_preemption.py::test_sigterm_to_every_process_checkpoints_and_the_run_resumes_on_two_nodes",
        "tests/test_preemption.py::test_accelerate_launch_on_two_machines",
    ),
    r"torchrun --nproc_per_node \d+ train_imagenet\.py --dataset (wds|parquet|hfds) --data-dir": (
        "tests/test_image_data.py::test_train_on_each_format_in_one_process",
        "tests/test_image_data.py::test_two_processes_validate_as_the_folder_and_train_on_hfds",
        "tests/test_preemption.py::test_sigterm_to_every_process_checkpoints_and_the_run_resumes_on_two_nodes",
        "tests/test_preemption.py::test_slurm_script_checkpoints_on_sigusr1_requeues_and_continues",
    ),
    r"sbatch examples/slurm/train_imagenet\.sbatch$": (
        "tests/test_preemption.py::test_slurm_script_checkpoints_on_sigusr1_requeues_and_continues",
    ),
    r"accelerate launch --multi_gpu --num_processes 2$": "not run: a program named in prose, full commands above",
    r"accelerate launch --cpu --num_processes 2": "not run: documented as not starting two processes on a CPU-only machine",
    r"accelerate launch --config_file$": "not run: a program named in prose, full commands above",
    r"python validate\.py --data-dir /data/imagenet --checkpoint model_best\.pth": (
        "tests/test_validate.py::test_accuracy_matches_independent_evaluation",
        "tests/test_validate.py::test_reparam_gives_same_accuracy",
        "tests/test_validate.py::test_compare_reparam_reports_small_difference",
    ),
    r"torchrun --nproc_per_node \d+ validate\.py": (
        "tests/test_validate.py::test_torchrun_two_processes_count_each_image_once",
    ),
    r"python validate\.py --data-dir \. --checkpoint model_best\.pth": "here",
    r"python validate\.py --dataset (wds|parquet|hfds) --data-dir": (
        "tests/test_validate.py::test_shards_validate_as_the_folder",
        "tests/test_validate.py::test_torchrun_two_processes_validate_shards_once",
    ),
    r"python benchmarks/throughput\.py --model": "here",
    # ConvNeXt -> MRConvNeXt measurement block, run as written with one epoch per training
    r"(OUT=/tmp/convnext-digits|RECIPE=)": ("tests/test_convert.py::test_readme_conversion_commands",),
    r"python benchmarks/digits_folder\.py \$OUT/digits": ("tests/test_convert.py::test_readme_conversion_commands",),
    r"python train_imagenet\.py --model (convnext|mrconvnext)_atto .*\$RECIPE$": (
        "tests/test_convert.py::test_readme_conversion_commands",
    ),
    r"python -m mrconvnext\.convert \S": ("tests/test_convert.py::test_readme_conversion_commands",),
    r"python benchmarks/convnext_conversion\.py": ("tests/test_convert.py::test_readme_conversion_commands",),
    r"python benchmarks/digits_folder\.py digits --size 32$": (
        "tests/test_branch_norm.py::test_digits_folder_as_the_readme_runs_it",
    ),
    r"python benchmarks/branch_norm\.py digits$": ("tests/test_branch_norm.py::test_norm_benchmark_prints_the_table",),
    r"python -m mrconvnext\.plot (--model \S+ )?--checkpoint \S+ --out \S+$": (
        "tests/test_plot.py::test_cli_writes_every_plot_kind",
        "tests/test_install.py::test_plot_reads_the_demo_checkpoint_and_its_export",
    ),
    r"python -m mrconvnext\.(plot|export)( --format onnx)?$": "not run: a program named in prose, full commands above",
    r"pip install [\"']\.\[(plot|export|data)\][\"']$": "suite: the dev extra `make test` installs includes it",
    r"pip install \.$": (
        "tests/test_install.py::test_fresh_environment_has_the_package_and_no_extra",
        "tests/test_install.py::test_installed_demo_passes_without_matplotlib",
    ),
    r"python -m mrconvnext\.export --format onnx --checkpoint": (
        "tests/test_onnx_export.py::test_readme_deploy_commands",
    ),
    # the command `make cpu-torch` runs (against an unreachable index in the test: no torch download)
    r"(make cpu-torch$|pip install torch torchvision --index-url )": (
        "tests/test_install.py::test_makefile_prefers_cpu_torch_without_a_gpu_and_falls_back",
    ),
    r"make gpu-check$": ("tests/test_devices.py::test_make_gpu_check_refuses_to_run_without_cuda",),
    r"python train_sequence\.py --task \w+ --data-dir": (
        "tests/test_train_sequence.py::test_readme_task_commands_resolve_the_paper_recipe_and_read_their_layout",
        "tests/test_train_sequence.py::test_kill_and_resume_continue_exactly",
    ),
    r"torchrun --nproc_per_node \d+ train_sequence\.py": (
        "tests/test_train_sequence.py::test_two_processes_with_torchrun",
    ),
    r"make demo-lra$": (
        "tests/test_train_sequence.py::test_demo_lra_commands_run",
        "tests/test_train_sequence.py::test_demo_lra_beats_majority_class",
    ),
    r"python (-m benchmarks\.sequence_benchmark|benchmarks/benchmark\.py (--targets 6|--quick$|--profile$))": (
        "tests/test_readme.py::test_benchmark_script_runs",
    ),
}


def _pattern(command: str) -> str | None:
    """The first ``COMMANDS`` pattern that matches ``command``."""
    plain = _without_env(command)
    return next((pattern for pattern in COMMANDS if re.match(pattern, plain)), None)


def _entry(command: str) -> str | tuple[str, ...] | None:
    pattern = _pattern(command)
    return COMMANDS[pattern] if pattern else None


def test_every_readme_command_is_exercised() -> None:
    commands = shell_commands()
    assert any(c.startswith("python -m mrconvnext.export") for c in commands), "command extraction found too little"
    unmapped = [c for c in commands if _entry(c) is None]
    assert not unmapped, "README commands no test runs; add them to tests/test_readme.py COMMANDS:\n" + "\n".join(
        unmapped
    )
    stale = set(COMMANDS) - {_pattern(c) for c in commands}
    assert not stale, f"COMMANDS entries no README command matches any more (remove them): {sorted(stale)}"
    for command in commands:
        where = _entry(command)
        for node in where if isinstance(where, tuple) else ():
            path, name = node.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{command!r}: no test {node}"


# ------------------------------------------------------------------------------------ the prepared directory


def _add_to_hf_cache(cache: Path, repo_id: str, files: Path) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    for file in files.iterdir():
        shutil.copy(file, repo / "snapshots" / commit / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The placeholders the README's blocks and commands name, as real files."""
    root = tmp_path_factory.mktemp("readme")
    for script in ("train_imagenet.py", "validate.py", "benchmarks"):  # README commands run from the repo root
        (root / script).symlink_to(ROOT / script)
    torch.manual_seed(0)
    model = timm.create_model("mrconvnext_tiny")
    state = model.state_dict()
    save_checkpoint_file(checkpoint_record(model, state_dict_ema=state), root / "ckpt.pth")
    (root / "output" / "train" / "RUN").mkdir(parents=True)
    os.link(root / "ckpt.pth", root / "output" / "train" / "RUN" / "model_best.pth")
    export_model(root / "ckpt.pth", root / "deploy_dir", verify=False)
    _add_to_hf_cache(root / "hf-cache", "org/repo", root / "deploy_dir")
    # the validate.py sample: a 10-class folder of 50 images in the working directory, an atto checkpoint at 64 px
    make_shapes_dataset(root / "shapes", 5, 0, size=64, classes=tuple(f"c{i}" for i in range(10)), seed=0)
    for folder in (root / "shapes" / "train").iterdir():
        shutil.move(folder, root / folder.name)
    atto = timm.create_model("mrconvnext_atto", img_size=64, num_classes=10)
    save_checkpoint_file(checkpoint_record(atto), root / "model_best.pth")
    return root


def _env(workdir: Path) -> dict:
    return dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python` is this interpreter
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(workdir / "hf-cache"),
        HF_HOME=str(workdir / "hf-home"),
    )


@functools.cache
def _run_python_block(index: int, workdir: Path) -> str:
    _, body, _ = python_blocks()[index]
    for placeholder, value in PLACEHOLDERS.items():
        body = body.replace(placeholder, value)
    # each block in a folder of its own holding links to the prepared files, so what it writes (e.g. plot
    # images) stays out of the image folder that the README's validate.py sample reads from the working directory
    block_dir = workdir.parent / f"{workdir.name}-python-block-{index}"
    block_dir.mkdir()
    for entry in workdir.iterdir():
        (block_dir / entry.name).symlink_to(entry)
    script = block_dir / "readme_block.py"
    script.write_text(body)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=block_dir, env=_env(workdir), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"README block {index}:\n{body}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, id=f"line{line}", marks=[pytest.mark.slow] if slow else [])
        for i, (line, _, slow) in enumerate(python_blocks())
    ],
)
def test_readme_python_block_runs(index, workdir) -> None:
    _run_python_block(index, workdir)


def test_model_table_is_the_scripts_output(workdir) -> None:
    """The MRConvNeXt table's parameter and GMACs columns are what the README's script prints."""
    (index,) = [i for i, (_, body, _) in enumerate(python_blocks()) if "FlopCounterMode" in body]
    printed = re.findall(
        r"^(\S+): train ([\d.]+)M, deploy ([\d.]+)M, ([\d.]+) GMACs$", _run_python_block(index, workdir), re.M
    )
    table = re.findall(
        r"^\| `(mrconvnext_\w+)` \| [^|]+ \| ([\d.]+)M \| ([\d.]+)M \| ([\d.]+) \|", README.read_text(), re.M
    )
    assert printed and sorted(printed) == sorted(table)


READMES_RUN_HERE = [c for c in shell_commands() if _entry(c) == "here"]


@pytest.mark.parametrize("command", READMES_RUN_HERE, ids=[re.sub(r"\W+", "-", c)[:60] for c in READMES_RUN_HERE])
def test_readme_command_runs(command, workdir) -> None:
    command = command.replace(".venv/bin/python", sys.executable)  # the venv `make` creates: this interpreter
    result = subprocess.run(
        command, shell=True, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"


def test_selfcheck_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mrconvnext.selfcheck"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines()[-1].startswith("PASS: "), result.stdout  # the verdict, last


@pytest.mark.slow
def test_benchmark_script_runs() -> None:
    """``make benchmark`` as shipped (many minutes on 2 cores) with the README's ``--profile`` table, and the
    README's ``--quick`` run: each must finish."""
    for command in (
        ["benchmarks/benchmark.py", "--profile"],
        ["-m", "benchmarks.sequence_benchmark"],
        ["benchmarks/benchmark.py", "--quick"],
    ):
        result = subprocess.run(
            [sys.executable, *command], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
