"""Inference throughput of a model's train and deploy forms, and of a timm baseline, timed in one process.

    python benchmarks/throughput.py --model mrconvnext_atto --baseline convnext_atto --img-size 64 -b 16

Random input batches of the model's input size (``--img-size``, else its pretrained cfg's; with
``--checkpoint`` the model, its planned size and its form come from the checkpoint). Every form is warmed up,
then all are timed round-robin (``benchmarks/timing.py``): ``--rounds`` rounds of ``--batches`` batches each.
Prints one JSON line: median images/s and batch latency per form, and the ratios (``deploy_speedup`` is deploy
over train form; ``*_vs_baseline`` the form's images/s over the baseline's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.models import resolve_model_input_args
from timm.utils import ParseKwargs, reparameterize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mrconvnext  # noqa: E402, F401  (registers the models)
from benchmarks.timing import compare, machine_info  # noqa: E402
from mrconvnext.utils.checkpoint import CheckpointError, create_model_from_checkpoint  # noqa: E402
from mrconvnext.utils.cli import out_of_range  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mrconvnext_tiny", help="registered model (default: %(default)s)")
    parser.add_argument("--checkpoint", default="", help="weights (and model record) to time instead of a fresh model")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="create_model kwargs")
    parser.add_argument("--baseline", default="", help="timm model timed in the same rounds, e.g. convnext_tiny")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("-b", "--batch-size", type=int, default=16, help="batch (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=10, help="batches per timed round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    problem = out_of_range(args, positive="img_size batch_size batches rounds".split(), non_negative=["warmup"])
    if problem:
        parser.error(problem)
    device = torch.device(args.device)
    try:
        if args.checkpoint:
            model = create_model_from_checkpoint(args.checkpoint, args.model, **args.model_kwargs)
        else:  # a model built for one size (MRConvNeXt: its planned kernels) is built for the size it is timed at
            model = timm.create_model(**resolve_model_input_args(args.model, vars(args), **args.model_kwargs)).eval()
    except (CheckpointError, FileNotFoundError, RuntimeError, ValueError, TypeError) as e:
        parser.error(f"cannot create model {args.model!r}: {e}")
    config = resolve_data_config({"img_size": args.img_size}, model=model)
    forms = {"train": model, "deploy": reparameterize_model(model)}
    if args.baseline:
        forms["baseline"] = timm.create_model(args.baseline).eval()
    params = {form: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for form, m in forms.items()}
    images = torch.randn(args.batch_size, *config["input_size"], device=device)
    with torch.inference_mode():
        fns = {}
        for form, net in forms.items():
            net = net.to(device)
            fns[form] = lambda net=net: [net(images) for _ in range(args.batches)]
        timings = compare(fns, args.rounds, args.warmup, device)
    rate = {form: args.batch_size * args.batches / timings[form] for form in forms}
    row = {"model": args.model, "device": device.type, "machine": machine_info(device)[0]}
    row.update(batch_size=args.batch_size, img_size=config["input_size"][-1])
    for form in forms:
        row[f"{form}_param_count"] = params[form]
        row[f"{form}_img_per_sec"] = round(rate[form], 2)
        row[f"{form}_batch_latency_ms"] = round(1e3 * timings[form] / args.batches, 3)
    row["deploy_speedup"] = round(timings.ratio("train", "deploy").median, 4)
    if args.baseline:
        row["baseline"] = args.baseline
        for form in ("train", "deploy"):
            row[f"{form}_vs_baseline"] = round(timings.ratio("baseline", form).median, 4)
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
