"""Readers for the sequence tasks' public on-disk formats (no downloads): LRA, sCIFAR, Speech Commands.

Every reader is a map-style dataset of ``(x, length, target)`` items (see each module), and every missing or
malformed file raises :class:`DataFormatError` naming the file, the layout expected and where the public
release is. :func:`create_dataset` picks the reader of a task of ``train_sequence.py``.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from .cifar import CifarSequences
from .common import SPLITS, DataFormatError
from .lra import LISTOPS_VOCAB, AanRetrieval, ImdbText, ListOps, Pathfinder
from .speech import SPEECH_COMMANDS, SpeechCommands

__all__ = [
    "SPLITS",
    "TASKS",
    "DataFormatError",
    "CifarSequences",
    "AanRetrieval",
    "ImdbText",
    "ListOps",
    "Pathfinder",
    "SpeechCommands",
    "LISTOPS_VOCAB",
    "SPEECH_COMMANDS",
    "create_dataset",
]

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx", "scifar", "speech")


def create_dataset(task: str, root: str, split: str, seq_len: int, decimate: int = 1) -> Dataset:
    """The ``split`` of ``task`` read from ``root``; token tasks are padded to ``seq_len`` (the model's length).

    ``decimate`` (Speech Commands only) keeps every ``decimate``-th sample: the zero-shot lower-rate test.
    """
    if decimate != 1 and task != "speech":
        raise ValueError(f"decimate={decimate} is only defined for the speech task, not {task!r}")
    if task == "listops":
        return ListOps(root, split, seq_len)
    if task == "text":
        return ImdbText(root, split, seq_len)
    if task == "retrieval":
        return AanRetrieval(root, split, seq_len)
    if task in ("image", "scifar"):
        return CifarSequences(root, split, grayscale=task == "image")
    if task == "pathfinder":
        return Pathfinder(root, split, resolution=32)
    if task == "pathx":
        return Pathfinder(root, split, resolution=128)
    if task == "speech":
        return SpeechCommands(root, split, decimate=decimate)
    raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
