"""Speech Commands v0.02 (Warden, 2018), 35 words, as raw 16 kHz waveforms (paper Section 5.3, Appendix D.4).

Layout of the public release (``speech_commands_v0.02.tar.gz``): one folder per word holding 16-bit mono PCM
``.wav`` clips of at most one second, ``_background_noise_/`` (unused), and ``validation_list.txt`` /
``testing_list.txt`` naming the clips of those splits (``word/file.wav``); every other clip is training data.
Clips are read with the standard library's ``wave`` module, scaled to zero mean and standard deviation 0.2
(Appendix D.4; per clip) and zero-padded to 16000 samples. ``decimate=2`` keeps every second sample (the
8 kHz zero-shot test of Table 3(b), 8000 samples). Items are ``(x (L, 1), L, label)``.
"""

from __future__ import annotations

import os
import wave

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import DataFormatError, check_split, find_dir, require_file, text_lines

__all__ = ["SPEECH_COMMANDS", "SpeechCommands", "read_wav"]

SPEECH_SOURCE = "speech_commands_v0.02.tar.gz, http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
LAYOUT = "<root>/<word>/*.wav (35 words), <root>/validation_list.txt, <root>/testing_list.txt"
SAMPLE_RATE = 16000
SPEECH_COMMANDS = tuple(
    sorted(
        "backward bed bird cat dog down eight five follow forward four go happy house learn left marvin nine no "
        "off on one right seven sheila six stop three tree two up visual wow yes zero".split()
    )
)


def read_wav(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Samples of a 16-bit mono PCM wav in ``[-1, 1)``; a clear error for anything else."""
    try:
        with wave.open(path, "rb") as f:
            channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            data = f.readframes(frames)
    except (wave.Error, EOFError, OSError, RuntimeError) as err:  # RuntimeError: a chunk size past the end
        raise DataFormatError(f"{path}: unreadable wav ({err}); expected 16-bit mono PCM at {sample_rate} Hz") from err
    if (channels, width, rate) != (1, 2, sample_rate):
        raise DataFormatError(
            f"{path}: {channels} channel(s), {8 * width}-bit, {rate} Hz; expected 16-bit mono PCM at {sample_rate} Hz"
        )
    if len(data) != 2 * frames:
        raise DataFormatError(f"{path}: truncated wav ({len(data) // 2} of {frames} samples)")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


class SpeechCommands(Dataset):
    """Speech Commands v0.02, 35-way word classification on one-second waveforms."""

    num_classes = len(SPEECH_COMMANDS)

    def __init__(self, root: str, split: str, decimate: int = 1) -> None:
        check_split(split)
        self.root = find_dir(root, "speech_commands_v0.02", "Speech Commands", LAYOUT, SPEECH_SOURCE)
        self.decimate = decimate
        lists = {}
        for name, list_split in (("validation_list.txt", "val"), ("testing_list.txt", "test")):
            path = require_file(os.path.join(self.root, name), "Speech Commands", LAYOUT, SPEECH_SOURCE)
            lists[list_split] = [line.strip() for line in text_lines(path, LAYOUT) if line.strip()]
        missing = [w for w in SPEECH_COMMANDS if not os.path.isdir(os.path.join(self.root, w))]
        if missing:
            raise DataFormatError(
                f"Speech Commands: {self.root!r} has no folder for {', '.join(missing[:5])}; expected {LAYOUT} "
                f"({SPEECH_SOURCE})"
            )
        if split == "train":
            held_out = set(lists["val"]) | set(lists["test"])
            files = [
                f"{word}/{name}"
                for word in SPEECH_COMMANDS
                for name in sorted(os.listdir(os.path.join(self.root, word)))
                if name.endswith(".wav") and f"{word}/{name}" not in held_out
            ]
        else:
            files = lists[split]
        self.files: list[str] = []
        self.targets: list[int] = []
        index = {word: i for i, word in enumerate(SPEECH_COMMANDS)}
        list_name = {"val": "validation_list.txt", "test": "testing_list.txt"}.get(split)
        for relative in files:
            word = relative.split("/")[0]
            if word not in index:
                raise DataFormatError(
                    f"{os.path.join(self.root, list_name)}: {relative!r} is not in one of the 35 word folders "
                    f"({', '.join(SPEECH_COMMANDS[:3])}, ...)"
                )
            self.files.append(os.path.join(self.root, relative))
            self.targets.append(index[word])
        if not self.files:
            raise DataFormatError(f"Speech Commands: no {split!r} clips under {self.root!r}; expected {LAYOUT}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        samples = read_wav(self.files[index])
        if len(samples) > SAMPLE_RATE:
            raise DataFormatError(f"{self.files[index]}: {len(samples)} samples, expected at most {SAMPLE_RATE} (1 s)")
        clip = np.zeros(SAMPLE_RATE, dtype=np.float32)
        if len(samples):
            clip[: len(samples)] = 0.2 * (samples - samples.mean()) / max(float(samples.std()), 1e-5)
        x = torch.from_numpy(clip[:: self.decimate].copy())[:, None]
        return x, x.shape[0], self.targets[index]
