"""Readers of the sequence tasks' public formats, on fixtures written in the exact release layouts."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mrconvnext.data import (
    LISTOPS_VOCAB,
    SPEECH_COMMANDS,
    AanRetrieval,
    CifarSequences,
    DataFormatError,
    ImdbText,
    ListOps,
    Pathfinder,
    SpeechCommands,
    create_dataset,
    listops_generator,
)
from mrconvnext.data.listops_generator import generate_listops

from .image_formats import bomb_png
from .sequence_fixtures import (
    write_aan,
    write_cifar,
    write_imdb,
    write_pathfinder,
    write_speech_commands,
    write_wav,
)


def listops_reference_value(source: str) -> int:
    """Independent evaluation of a release-format ListOps string with an explicit stack."""
    stack = [[]]
    for token in source.replace("(", " ").replace(")", " ").split():
        if token.startswith("["):
            stack.append([token])
        elif token == "]":
            operator, *values = stack.pop()
            if operator == "[MIN":
                result = min(values)
            elif operator == "[MAX":
                result = max(values)
            elif operator == "[SM":
                result = sum(values) % 10
            else:
                ordered = sorted(values)
                middle = len(ordered) // 2
                result = int(ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2)
            stack[-1].append(result)
        else:
            stack[-1].append(int(token))
    (value,) = stack[0]
    return value


def write_tsv(path, text):
    with open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------------- ListOps


def test_listops_tokenization_padding_and_truncation(tmp_path):
    write_tsv(tmp_path / "basic_train.tsv", "Source\tTarget\n( ( ( [MAX 2 ) ( ( [SM 3 ) 4 ] ) ) ] )\t7\n")
    ids = {token: i for i, token in enumerate(LISTOPS_VOCAB)}
    x, length, target = ListOps(str(tmp_path), "train", 12)[0]
    expected = [ids[t] for t in ("[MAX", "2", "[SM", "3", "4", "X", "X", "<eos>")]
    assert len(LISTOPS_VOCAB) == 18 and ids["<pad>"] == 0
    assert length == 8 and target == 7 and x.tolist() == expected + [0] * 4
    x, length, _ = ListOps(str(tmp_path), "train", 5)[0]  # truncated: <eos> kept last, as S4
    assert length == 5 and x.tolist() == expected[:4] + [ids["<eos>"]]


def test_generated_listops_follows_the_grammar_and_the_release_layout(tmp_path):
    paths = generate_listops(str(tmp_path), 200, 30, 40, max_depth=4, max_args=4, max_length=60, seed=3)
    assert sorted(os.listdir(tmp_path)) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]  # no .tmp left
    sources = []
    for split, size in (("train", 200), ("val", 30), ("test", 40)):
        with open(paths[split]) as f:
            lines = f.read().splitlines()
        assert lines[0] == "Source\tTarget" and len(lines) == size + 1
        for line in lines[1:]:
            source, target = line.split("\t")
            assert int(target) == listops_reference_value(source), line
            sources.append(source)
        dataset = ListOps(str(tmp_path), split, 64)
        assert len(dataset) == size and all(1 < dataset[i][1] <= 61 for i in range(size))
    assert len(set(sources)) == len(sources)
    assert {s.split()[3] for s in sources} >= {"[MIN", "[MAX", "[MED", "[SM"}  # every operator at some root
    again = tmp_path / "again"
    generate_listops(str(again), 200, 30, 40, max_depth=4, max_args=4, max_length=60, seed=3)
    assert (again / "basic_test.tsv").read_text() == (tmp_path / "basic_test.tsv").read_text()


def test_listops_generator_names_a_value_out_of_range(tmp_path, capsys):
    for kwargs, message in [
        (dict(num_train=-5), "num_train must be at least 0, got -5"),  # sliced the rows from the end
        (dict(max_args=1), "max_args must be at least 2, got 1"),  # random.randrange(2, 2) before
        (dict(num_train=10, num_val=0, num_test=0, max_length=3), "could not draw 10 distinct expressions"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate_listops(str(tmp_path), **kwargs)
    with pytest.raises(SystemExit) as info:
        listops_generator.main([str(tmp_path), "--max-args", "1"])
    assert info.value.code == 2 and "error: max_args must be at least 2, got 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "content, message",
    [
        ("Input\tOutput\n( [MAX 1 2 ] )\t2\n", "header"),
        ("Source\tTarget\n( [MAX 1 2 ] )\t10\n", "line 2: label '10' is not a class"),
        ("Source\tTarget\n( [MAX 1 2 ] )\tx\n", "line 2: label 'x'"),
        ("Source\tTarget\n( [MAX 1 2 ] )\t2\t1\n", "line 2: 3 columns, expected 2"),
        ("Source\tTarget\n", "no examples"),
    ],
)
def test_listops_malformed_files(tmp_path, content, message):
    write_tsv(tmp_path / "basic_val.tsv", content)
    with pytest.raises(DataFormatError, match=message) as info:
        ListOps(str(tmp_path), "val", 16)
    assert "basic_val.tsv" in str(info.value)


def test_text_files_that_are_not_text_name_themselves(tmp_path):
    """A binary file where a text file belongs (a numpy .npy where Pathfinder's metadata lists are text, bytes
    that are no UTF-8): a DataFormatError naming the file, not a UnicodeDecodeError."""
    (tmp_path / "basic_val.tsv").write_bytes(b"Source\tTarget\n( [MAX 1 \xff ] )\t2\n")
    with pytest.raises(DataFormatError, match=r"basic_val\.tsv: not UTF-8 text"):
        ListOps(str(tmp_path), "val", 16)
    write_pathfinder(tmp_path)
    metadata = tmp_path / "pathfinder32" / "curv_contour_length_14" / "metadata" / "0.npy"
    with open(metadata, "wb") as f:
        np.save(f, np.arange(20.0))
    with pytest.raises(DataFormatError, match=r"0\.npy: not UTF-8 text"):
        Pathfinder(str(tmp_path), "train")


def test_listops_missing_split_names_file_and_release(tmp_path):
    write_tsv(tmp_path / "basic_train.tsv", "Source\tTarget\n1\t1\n")
    with pytest.raises(DataFormatError, match="basic_test.tsv") as info:
        ListOps(str(tmp_path), "test", 16)
    assert "long-range-arena" in str(info.value) and "Source" in str(info.value)
    with pytest.raises(DataFormatError, match="does not exist"):
        ListOps(str(tmp_path / "nowhere"), "train", 16)
    nested = tmp_path / "lra_release"
    (nested / "listops-1000").mkdir(parents=True)
    write_tsv(nested / "listops-1000" / "basic_train.tsv", "Source\tTarget\n( [MIN 3 4 ] )\t3\n")
    assert len(ListOps(str(nested), "train", 8)) == 1  # the release folder or listops-1000 itself


# ---------------------------------------------------------------------------------------------------- Text


def test_imdb_reader_bytes_labels_and_val_is_test(tmp_path):
    write_imdb(tmp_path)
    train = ImdbText(str(tmp_path), "train", 64)
    assert len(train) == 6 and sorted(train.targets) == [0, 0, 0, 1, 1, 1]
    for index in range(len(train)):
        x, length, target = train[index]
        text = open(train.files[index], "rb").read()[:64]
        expected = [b + 1 if 0 < b < 128 else 1 for b in text]  # 'é' is two bytes >= 128: <unk>
        assert length == len(expected) and x[:length].tolist() == expected and not x[length:].any()
        assert target == (os.path.basename(os.path.dirname(train.files[index])) == "pos")
    assert max(x.max().item() for x, _, _ in train) < 129
    assert ImdbText(str(tmp_path), "val", 64).files == ImdbText(str(tmp_path), "test", 64).files


def test_imdb_missing_class_folder(tmp_path):
    write_imdb(tmp_path)
    for name in os.listdir(tmp_path / "aclImdb" / "test" / "pos"):
        os.remove(tmp_path / "aclImdb" / "test" / "pos" / name)
    with pytest.raises(DataFormatError, match=r"no \.txt reviews in .*test.pos"):
        ImdbText(str(tmp_path), "test", 64)
    os.rmdir(tmp_path / "aclImdb" / "test" / "pos")
    with pytest.raises(DataFormatError, match=r"missing folder .*test.pos.*aclImdb/\{train,test\}/\{neg,pos\}"):
        ImdbText(str(tmp_path), "test", 64)


# ----------------------------------------------------------------------------------------------- Retrieval


def test_aan_pairs_tokens_lengths_and_labels(tmp_path):
    write_aan(tmp_path)
    dataset = AanRetrieval(str(tmp_path), "val", 20)  # 'val' is the release's eval split
    assert len(dataset) == 4 and dataset.targets == [0, 1, 0, 1]
    x, lengths, target = dataset[1]
    first, second = "first document 1", "second ~ document 1"[:20]
    assert x.shape == (2, 20) and lengths.tolist() == [len(first), len(second)] and target == 1
    assert x[0, : len(first)].tolist() == [ord(c) - 30 for c in first] and not x[0, len(first) :].any()
    assert x[1, : len(second)].tolist() == [ord(c) - 30 for c in second]


@pytest.mark.parametrize(
    "row, message",
    [
        ("1\tp1\tp2\tonly one text\n", "line 2: 4 columns, expected 5"),
        ("2\tp1\tp2\ta\tb\n", "line 2: label '2' is not a class"),
        ("yes\tp1\tp2\ta\tb\n", "line 2: label 'yes'"),
    ],
)
def test_aan_malformed_rows(tmp_path, row, message):
    write_tsv(tmp_path / "new_aan_pairs.train.tsv", "0\tp0\tp9\ttext a\ttext b\n" + row)
    with pytest.raises(DataFormatError, match=message) as info:
        AanRetrieval(str(tmp_path), "train", 16)
    assert "new_aan_pairs.train.tsv" in str(info.value)


def test_aan_missing_split(tmp_path):
    write_aan(tmp_path)
    os.remove(tmp_path / "new_aan_pairs.test.tsv")
    with pytest.raises(DataFormatError, match=r"new_aan_pairs\.test\.tsv.*label id1 id2 text1 text2"):
        AanRetrieval(str(tmp_path), "test", 16)


# ------------------------------------------------------------------------------------------ Image / sCIFAR


def test_cifar_sequences_grayscale_rgb_and_splits(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f)
    image = batch["data"][2].reshape(3, 32, 32).astype(np.float64) / 255
    gray = CifarSequences(str(tmp_path), "test", grayscale=True)[2]
    rgb = CifarSequences(str(tmp_path), "test", grayscale=False)[2]
    luma = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    assert gray[0].shape == (1024, 1) and gray[1] == 1024 and gray[2] == batch["labels"][2]
    assert np.allclose(gray[0][:, 0].numpy(), ((luma - 122.6 / 255) / (61.0 / 255)).reshape(-1), atol=1e-5)
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
    expected = (image.reshape(3, -1).T - mean) / std  # row-major pixels, channels last
    assert rgb[0].shape == (1024, 3) and np.allclose(rgb[0].numpy(), expected, atol=1e-5)
    train = CifarSequences(str(tmp_path), "train", grayscale=True)
    val = CifarSequences(str(tmp_path), "val", grayscale=True)
    assert (len(train), len(val)) == (18, 2)
    everything = {tuple(x.view(-1).tolist()) for x in torch.cat([train.pixels, val.pixels]).view(20, -1)}
    assert len(everything) == 20  # a partition of the five train batches


class _Touch:
    """Pickles as a call of ``Path.touch`` on ``path``: whoever loads it with ``pickle.load`` creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return type(self.path).touch, (self.path,)


def test_cifar_malformed_batches(tmp_path):
    write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, f)
    with pytest.raises(DataFormatError, match="data_batch_3: label 10 is not a CIFAR-10 class"):
        CifarSequences(str(tmp_path), "train", grayscale=True)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match="data_batch_3: not a CIFAR-10 batch"):
        CifarSequences(str(tmp_path), "val", grayscale=False)
    for garbage in (b"}cd,:0f1de\n}0ec0b1hd{\n0 121{jh", b"\x8e\xdf\xaf\xf2\xbc\x0cz\x87\xcaQ:E~"):
        (folder / "data_batch_3").write_bytes(garbage)  # read by the unpickler as an import / an oversized int
        with pytest.raises(DataFormatError, match="data_batch_3: not a CIFAR-10 batch"):
            CifarSequences(str(tmp_path), "val", grayscale=False)
    # a pickle that calls a function when loaded: refused before the call, naming the function
    (folder / "data_batch_3").write_bytes(pickle.dumps(_Touch(tmp_path / "ran")))
    with pytest.raises(DataFormatError, match=r"data_batch_3: not a CIFAR-10 batch .*pathlib\..*touch"):
        CifarSequences(str(tmp_path), "val", grayscale=False)
    assert not (tmp_path / "ran").exists()
    for protocol in (2, 4, 5):  # the release's protocol 2 (Python 2), and what numpy writes with later ones
        with open(folder / "data_batch_3", "wb") as f:
            pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 9]}, f, protocol=protocol)
        sizes = [len(CifarSequences(str(tmp_path), split, grayscale=True)) for split in ("train", "val")]
        assert sum(sizes) == 4 * 4 + 2  # four batches of the fixture's 4 and this one's 2
    os.remove(folder / "test_batch")
    with pytest.raises(DataFormatError, match=r"missing file .*test_batch.*cifar-10-batches-py"):
        CifarSequences(str(tmp_path), "test", grayscale=True)


# ------------------------------------------------------------------------------------- Pathfinder / Path-X


def test_pathfinder_splits_pixels_and_labels(tmp_path):
    write_pathfinder(tmp_path)
    splits = {split: Pathfinder(str(tmp_path), split) for split in ("train", "val", "test")}
    assert [len(s) for s in splits.values()] == [16, 2, 2]
    paths = [path for s in splits.values() for path, _ in s.samples]
    assert len(set(paths)) == 20
    x, length, label = splits["val"][0]
    path, expected_label = splits["val"].samples[0]
    from PIL import Image

    pixels = np.asarray(Image.open(path), dtype=np.float64)
    assert x.shape == (1024, 1) and length == 1024 and label == expected_label == int(path[-5]) % 2
    assert np.allclose(x[:, 0].numpy(), pixels.reshape(-1) / 127.5 - 1, atol=1e-6)
    assert create_dataset("pathfinder", str(tmp_path / "pathfinder32"), "test", 1024).samples == splits["test"].samples


def test_pathx_reads_pathfinder128(tmp_path):
    write_pathfinder(tmp_path, resolution=128, images=10)
    x, length, _ = create_dataset("pathx", str(tmp_path), "train", 16384)[0]
    assert x.shape == (16384, 1) and length == 16384


def test_pathfinder_malformed(tmp_path):
    write_pathfinder(tmp_path)
    metadata = tmp_path / "pathfinder32" / "curv_contour_length_14" / "metadata" / "0.npy"
    good = metadata.read_text()
    metadata.write_text(good + "imgs/0 sample_3.png 3 2 1.0 5\n")
    with pytest.raises(DataFormatError, match=r"0\.npy, line 21: label '2' is not a class"):
        Pathfinder(str(tmp_path), "train")
    metadata.write_text(good + "imgs/0 sample_3.png\n")
    with pytest.raises(DataFormatError, match=r"0\.npy, line 21: 2 fields"):
        Pathfinder(str(tmp_path), "train")
    metadata.write_text(good)
    from PIL import Image

    dataset = Pathfinder(str(tmp_path), "test")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(dataset.samples[0][0])
    with pytest.raises(DataFormatError, match="is 16x16, expected 32x32"):
        dataset[0]
    with open(dataset.samples[1][0], "wb") as f:
        f.write(b"broken")
    with pytest.raises(DataFormatError, match="cannot read image"):
        dataset[1]
    Path(dataset.samples[1][0]).write_bytes(bomb_png())  # over PIL's decompression-bomb limit: not an OSError
    with pytest.raises(DataFormatError, match="cannot read image"):
        dataset[1]
    with pytest.raises(DataFormatError, match=r"missing folder .*curv_baseline.metadata"):
        Pathfinder(str(tmp_path), "train", difficulty="curv_baseline")


# ------------------------------------------------------------------------------------------ Speech Commands


def test_speech_commands_splits_padding_normalization_and_decimation(tmp_path):
    write_speech_commands(tmp_path, per_word=3)
    short = tmp_path / "yes" / "00000002_nohash_0.wav"  # a training clip shorter than one second
    write_wav(str(short), 6000 * np.sin(np.arange(9000) / 7.0))
    train, val, test = (SpeechCommands(str(tmp_path), s) for s in ("train", "val", "test"))
    assert len(SPEECH_COMMANDS) == 35 and (len(train), len(val), len(test)) == (35, 35, 35)
    assert not set(train.files) & (set(val.files) | set(test.files))
    index = train.files.index(str(short))
    x, length, label = train[index]
    assert x.shape == (16000, 1) and length == 16000 and SPEECH_COMMANDS[label] == "yes"
    valid = x[:9000, 0].double()
    assert abs(valid.mean()) < 1e-5 and abs(valid.std(unbiased=False) - 0.2) < 1e-4 and not x[9000:].any()
    low = SpeechCommands(str(tmp_path), "train", decimate=2)[index][0]
    assert low.shape == (8000, 1) and torch.equal(low, x[::2])
    assert create_dataset("speech", str(tmp_path), "test", 16000, decimate=2)[0][0].shape == (8000, 1)


def test_speech_commands_malformed(tmp_path):
    write_speech_commands(tmp_path, per_word=2)
    test = SpeechCommands(str(tmp_path), "test")
    (tmp_path / "bed" / "00000001_nohash_0.wav").write_bytes(b"RIFF garbage")
    index = test.files.index(str(tmp_path / "bed" / "00000001_nohash_0.wav"))
    with pytest.raises(DataFormatError, match=r"bed.00000001_nohash_0\.wav: unreadable wav"):
        test[index]
    header = bytearray(Path(test.files[(index + 1) % len(test.files)]).read_bytes())  # another, good wav
    header[16:20] = (0x20000).to_bytes(4, "little")  # a fmt chunk longer than the file: wave raises RuntimeError
    (tmp_path / "bed" / "00000001_nohash_0.wav").write_bytes(bytes(header))
    with pytest.raises(DataFormatError, match=r"bed.00000001_nohash_0\.wav: unreadable wav"):
        test[index]
    write_wav(str(tmp_path / "bed" / "00000001_nohash_0.wav"), np.zeros(16000), rate=8000)
    with pytest.raises(DataFormatError, match="1 channel.*8000 Hz; expected 16-bit mono PCM at 16000 Hz"):
        test[index]
    write_wav(str(tmp_path / "bed" / "00000001_nohash_0.wav"), np.zeros(17000))
    with pytest.raises(DataFormatError, match="17000 samples, expected at most 16000"):
        test[index]
    with open(tmp_path / "testing_list.txt", "a") as f:
        f.write("notaword/0_nohash_0.wav\n")
    with pytest.raises(DataFormatError, match=r"testing_list\.txt: 'notaword/0_nohash_0\.wav' is not in one of"):
        SpeechCommands(str(tmp_path), "test")
    os.remove(tmp_path / "validation_list.txt")
    with pytest.raises(DataFormatError, match=r"missing file .*validation_list\.txt.*speech_commands_v0\.02"):
        SpeechCommands(str(tmp_path), "train")


def test_create_dataset_rejects_unknown_task_and_decimation(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'audio'"):
        create_dataset("audio", str(tmp_path), "train", 16)
    with pytest.raises(ValueError, match="only defined for the speech task"):
        create_dataset("listops", str(tmp_path), "train", 16, decimate=2)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ListOps(str(tmp_path), "dev", 16)
