"""Small data sets in the exact public release layouts, written by the tests (no downloads)."""

from __future__ import annotations

import os
import pickle
import wave

import numpy as np

from mrconvnext.data import SPEECH_COMMANDS


def write_imdb(root, per_class: int = 3) -> str:
    for split in ("train", "test"):
        for label, name in enumerate(("neg", "pos")):
            folder = os.path.join(root, "aclImdb", split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                text = ("great film, loved it " if label else "dull and slow, café ") * (i + 1)
                with open(os.path.join(folder, f"{i}_{7 + i}.txt"), "w", encoding="utf-8") as f:
                    f.write(text)
    return str(root)


def write_aan(root, rows: int = 4) -> str:
    for split in ("train", "eval", "test"):
        with open(os.path.join(root, f"new_aan_pairs.{split}.tsv"), "w") as f:
            for i in range(rows):
                f.write(f"{float(i % 2)}\tpaper{i}a\tpaper{i}b\tfirst document {i}\tsecond ~ document {i}\n")
    return str(root)


def write_cifar(root, per_batch: int = 4, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    return str(root)


def write_pathfinder(root, resolution: int = 32, images: int = 20, difficulty: str = "curv_contour_length_14") -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = os.path.join(root, f"pathfinder{resolution}", difficulty)
    os.makedirs(os.path.join(base, "imgs", "0"), exist_ok=True)
    os.makedirs(os.path.join(base, "metadata"), exist_ok=True)
    lines = []
    for i in range(images):
        pixels = rng.integers(0, 256, (resolution, resolution), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(base, "imgs", "0", f"sample_{i}.png"))
        lines.append(f"imgs/0 sample_{i}.png {i} {i % 2} 1.0 5\n")
    with open(os.path.join(base, "metadata", "0.npy"), "w") as f:
        f.writelines(lines)
    return str(root)


def write_wav(path: str, samples: np.ndarray, rate: int = 16000, channels: int = 1, width: int = 2) -> None:
    with wave.open(path, "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(samples.astype("<i2").tobytes() if width == 2 else samples.astype(np.uint8).tobytes())


def write_speech_commands(root, per_word: int = 3, length: int = 16000, words=SPEECH_COMMANDS) -> str:
    """Every word gets ``per_word`` clips: the first in the validation list, the second in the test list.

    Each word is a tone of its own frequency, so a model can learn the words (and hear them at 8 kHz).
    """
    rng = np.random.default_rng(0)
    val, test = [], []
    time = np.arange(length) / 16000
    for index, word in enumerate(words):
        os.makedirs(os.path.join(root, word), exist_ok=True)
        for i in range(per_word):
            tone = np.sin(2 * np.pi * (200 + 60 * index) * time) + 0.1 * rng.standard_normal(length)
            write_wav(os.path.join(root, word, f"{i:08x}_nohash_0.wav"), 8000 * tone)
            (val if i == 0 else test if i == 1 else []).append(f"{word}/{i:08x}_nohash_0.wav")
    os.makedirs(os.path.join(root, "_background_noise_"), exist_ok=True)
    for name, files in (("validation_list.txt", val), ("testing_list.txt", test)):
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(files) + "\n")
    return str(root)
