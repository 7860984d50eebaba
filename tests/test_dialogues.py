"""Tests for reformer_jax.data.dialogues (+ the optional TFDS storage).

Real-data tests use the staged corpora under the shared data dir
($REFORMER_DATA_DIR or <repo>/../shared/data) and skip when it is absent.
"""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

from reformer_jax.data import dialogues as dlg
from reformer_jax.data.dialogues import (
    SYSTEM,
    USER,
    Dialogue,
    download_multiwoz,
    format_dialogue,
    format_dialogue_with_spans,
    load_dialogues,
    multiwoz_urls,
    resolve_data_dir,
)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        return resolve_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"shared data dir not available: {e}")


@pytest.fixture(scope="module")
def multiwoz_val(data_dir: Path) -> list[Dialogue]:
    if not (data_dir / "multiwoz" / "val.json.xz").is_file():
        pytest.skip("multiwoz/val.json.xz not staged")
    return load_dialogues(data_dir / "multiwoz", split="validation")


def _sgd(data_dir: Path) -> Path:
    if not (data_dir / "sgd" / "dev").is_dir():
        pytest.skip("sgd/ not staged")
    return data_dir / "sgd"


# --------------------------------------------------------------------------- real data


def test_multiwoz21_validation_content(multiwoz_val: list[Dialogue], data_dir: Path) -> None:
    stats = dlg.dialogue_stats(multiwoz_val)
    assert stats == {"dialogues": 999, "turns": 14730, "user_turns": 7365, "system_turns": 7365}
    first = multiwoz_val[0]
    assert first.id == "PMUL1635"
    assert first.turns[0] == (USER, "I need to book a hotel in the east that has 4 stars .")
    assert first.turns[1] == (SYSTEM, "I can help you with that . What is your price range ?")
    assert all(s == (USER if i % 2 == 0 else SYSTEM) for d in multiwoz_val for i, (s, _) in enumerate(d.turns))
    listed = set((data_dir / "multiwoz" / "splits" / "valListFile.txt").read_text().split())
    assert {d.id for d in multiwoz_val} == listed


def test_multiwoz_train_split_missing_is_explained(data_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"No 'train' split in .*multiwoz.*download_multiwoz"):
        load_dialogues(data_dir / "multiwoz", split="train")


def test_sgd_dev_counts_and_first_turn(data_dir: Path) -> None:
    dev = load_dialogues(_sgd(data_dir), split="dev")
    assert dlg.dialogue_stats(dev)["dialogues"] == 2482
    assert dlg.dialogue_stats(dev)["turns"] == 48726
    assert dev[0].id == "1_00000"
    assert dev[0].turns[0] == (
        USER, "I want to make a restaurant reservation for 2 people at half past 11 in the morning."
    )


def test_sgd_test_split_drops_empty_turns_with_log(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="reformer_jax.data.dialogues"):
        test = load_dialogues(_sgd(data_dir) / "test")  # a split folder directly
    stats = dlg.dialogue_stats(test)
    assert stats["dialogues"] == 4201
    assert stats["turns"] == 84594 - 2  # the README count includes two empty utterances
    assert sum("dropped 1 empty turns" in r.getMessage() for r in caplog.records) == 2


def test_camrest_split_aliases_and_unified_sample(data_dir: Path) -> None:
    camrest = data_dir / "camrest676"
    if not camrest.is_dir():
        pytest.skip("camrest676/ not staged")
    val = load_dialogues(camrest, split="val")
    assert len(val) == 135 and len(load_dialogues(camrest, split="validation")) == 135
    assert len(load_dialogues(camrest, split="train")) == 406
    assert val[0].turns[0] == (
        USER, "I am looking for a restaurant in the north part of town that serves brazilian food."
    )
    unified = load_dialogues(data_dir / "multiwoz" / "train_sample10_convlab3_unified.json.xz")
    assert len(unified) == 10 and unified[0].turns[0][0] == USER and unified[0].turns[1][0] == SYSTEM


def test_format_dialogue_and_spans(multiwoz_val: list[Dialogue]) -> None:
    text = format_dialogue(multiwoz_val[0])
    assert text.startswith(
        "Person 1: I need to book a hotel in the east that has 4 stars . "
        "Person 2: I can help you with that . What is your price range ? Person 1: "
    )
    for dialogue in multiwoz_val[:50]:
        text, spans = format_dialogue_with_spans(dialogue)
        assert len(spans) == len(dialogue.turns)
        for span, (speaker, utterance) in zip(spans, dialogue.turns):
            assert span.speaker == speaker
            assert text[span.text_start : span.end] == utterance
            assert text[span.start : span.text_start] == ("Person 1: " if speaker == USER else "Person 2: ")
        assert " ".join(text[s.start : s.end] for s in spans) == text


# --------------------------------------------------------------------------- synthetic formats


def _write(path: Path, obj: object) -> Path:
    raw = json.dumps(obj).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".xz"):
        path.write_bytes(lzma.compress(raw))
    elif path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    elif path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("inner/data.json", raw)
    else:
        path.write_bytes(raw)
    return path


MWOZ21 = {
    "SNG0001.json": {"goal": {}, "log": [{"text": "hi there", "metadata": {}}, {"text": " hello ! "}]},
    "SNG0002.json": {"log": [{"text": "book a taxi"}, {"text": "where to ?"}, {"text": "the station"}]},
    "SNG0003.json": {"log": [{"text": "bye"}, {"text": "goodbye"}]},
}
SGD = [
    {"dialogue_id": "1_001", "services": [], "turns": [
        {"speaker": "USER", "utterance": "find a film", "frames": []},
        {"speaker": "SYSTEM", "utterance": "which city?", "frames": []},
    ]},
]


@pytest.mark.parametrize("name", ["data.json", "data.json.xz", "data.json.gz", "data.zip"])
def test_multiwoz21_file_compressions(tmp_path: Path, name: str) -> None:
    dialogues = load_dialogues(_write(tmp_path / name, MWOZ21))
    assert [d.id for d in dialogues] == ["SNG0001", "SNG0002", "SNG0003"]
    assert dialogues[0].turns == [(USER, "hi there"), (SYSTEM, "hello !")]
    assert dialogues[1].turns[2] == (USER, "the station")


def test_multiwoz22_split_folders(tmp_path: Path) -> None:
    _write(tmp_path / "train" / "dialogues_001.json.gz", SGD)
    _write(tmp_path / "train" / "dialogues_002.json", [dict(SGD[0], dialogue_id="1_002")])
    _write(tmp_path / "dev" / "dialogues_001.json.xz", [dict(SGD[0], dialogue_id="2_001")])
    (tmp_path / "train" / "schema.json").write_text("[]")  # ignored: not dialogues_*
    train = load_dialogues(tmp_path, split="train")
    assert [d.id for d in train] == ["1_001", "1_002"]
    assert train[0].turns == [(USER, "find a film"), (SYSTEM, "which city?")]
    assert [d.id for d in load_dialogues(tmp_path, split="validation")] == ["2_001"]
    with pytest.raises(FileNotFoundError, match="No 'test' split"):
        load_dialogues(tmp_path, split="test")
    with pytest.raises(ValueError, match="Unknown split"):
        load_dialogues(tmp_path, split="training")


def test_multiwoz21_data_json_with_list_files(tmp_path: Path) -> None:
    _write(tmp_path / "data.json", MWOZ21)
    (tmp_path / "valListFile.txt").write_text("SNG0002.json\n")
    (tmp_path / "testListFile.txt").write_text("SNG0003.json\n")
    assert [d.id for d in load_dialogues(tmp_path, split="train")] == ["SNG0001"]
    assert [d.id for d in load_dialogues(tmp_path, split="dev")] == ["SNG0002"]
    assert [d.id for d in load_dialogues(tmp_path, split="test")] == ["SNG0003"]
    assert len(load_dialogues(tmp_path)) == 3


# --------------------------------------------------------------------------- errors


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_dialogues(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no dialogues_"):
        load_dialogues(tmp_path)
    (tmp_path / "dev").mkdir()
    with pytest.raises(FileNotFoundError, match=r"dev has no dialogues_"):
        load_dialogues(tmp_path, split="dev")


def test_malformed_json_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "dialogues_001.json"
    bad.write_text('[{"dialogue_id": "x", "turns": [')
    with pytest.raises(ValueError, match=r"dialogues_001\.json: malformed JSON .*line 1"):
        load_dialogues(bad)
    truncated = tmp_path / "val.json.xz"
    truncated.write_bytes(lzma.compress(json.dumps(MWOZ21).encode())[:40])
    with pytest.raises(ValueError, match=r"val\.json\.xz: cannot decompress"):
        load_dialogues(truncated)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"SNG1": {"log": [{"text": "a"}]}, "SNG2": {"goal": {}}}, r"dialogue 'SNG2' has no 'log' key"),
        ({"SNG1": {"log": [{"text": "a"}, {"txt": "b"}]}}, r"dialogue 'SNG1' turn 1 has no 'text' key"),
        ([{"turns": []}], r"dialogue '#0' \(#0 in file\) has no 'dialogue_id' key"),
        ([{"dialogue_id": "d9", "turns": [{"speaker": "USER"}]}], r"dialogue 'd9' turn 0 has no 'utterance' key"),
        ([{"dialogue_id": "d9", "turns": [{"speaker": "BOT", "utterance": "x"}]}], r"turn 0 has speaker 'BOT'"),
        ("just a string", r"top-level JSON is a str"),
    ],
)
def test_schema_errors_name_file_dialogue_and_key(tmp_path: Path, data: object, message: str) -> None:
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(ValueError, match=message) as info:
        load_dialogues(path)
    assert str(path) in str(info.value) and "Expected" in str(info.value)


def test_empty_dialogues_skipped_or_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = {"A": {"log": []}, "B": {"log": [{"text": "  "}]}, "C": {"log": [{"text": "hi"}]}}
    with caplog.at_level(logging.WARNING, logger="reformer_jax.data.dialogues"):
        dialogues = load_dialogues(_write(tmp_path / "some.json", data))
    assert [d.id for d in dialogues] == ["C"]
    assert any("skipped 2 dialogues" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"empty\.json: no dialogue with any non-empty turn"):
        load_dialogues(_write(tmp_path / "empty.json", {"A": {"log": []}, "B": {"log": [{"text": ""}]}}))
    with pytest.raises(ValueError, match="no dialogue"):
        load_dialogues(_write(tmp_path / "none.json", []))


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    _write(tmp_path / "dialogues_001.json", SGD)
    _write(tmp_path / "dialogues_002.json", SGD)
    with pytest.raises(ValueError, match=r"Duplicate dialogue id '1_001' in .*dialogues_002\.json"):
        load_dialogues(tmp_path)


# --------------------------------------------------------------------------- paths / download


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFORMER_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(tmp_path / "..") == tmp_path / ".."
    with pytest.raises(FileNotFoundError, match="REFORMER_DATA_DIR"):
        resolve_data_dir(tmp_path / "missing")
    monkeypatch.setenv("REFORMER_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"missing \(from \$REFORMER_DATA_DIR\)"):
        resolve_data_dir()


def test_multiwoz_urls() -> None:
    urls = multiwoz_urls("2.2")
    assert len(urls) == 17 + 2 + 2
    assert urls[0] == (
        "https://raw.githubusercontent.com/budzianowski/multiwoz/master/data/MultiWOZ_2.2/train/dialogues_001.json",
        "MultiWOZ_2.2/train/dialogues_001.json",
    )
    assert urls[-1][1] == "MultiWOZ_2.2/test/dialogues_002.json"
    assert all(url.endswith(rel) for url, rel in urls)
    assert multiwoz_urls("2.1") == [
        ("https://github.com/budzianowski/multiwoz/raw/master/data/MultiWOZ_2.1.zip", "MultiWOZ_2.1.zip")
    ]
    with pytest.raises(ValueError, match="2.0"):
        multiwoz_urls("2.0")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_download_multiwoz22_offline_when_present(tmp_path: Path, no_network: None) -> None:
    for k, (_, rel) in enumerate(multiwoz_urls("2.2")):
        _write(tmp_path / rel, [dict(SGD[0], dialogue_id=f"PMUL{k:04d}.json")])
    root = download_multiwoz(tmp_path, "2.2")
    assert root == tmp_path / "MultiWOZ_2.2"
    assert [d.id for d in load_dialogues(root, split="dev")] == ["PMUL0017", "PMUL0018"]
    assert len(load_dialogues(root, split="train")) == 17


def test_download_multiwoz21_extracts_existing_zip(tmp_path: Path, no_network: None) -> None:
    with zipfile.ZipFile(tmp_path / "MultiWOZ_2.1.zip", "w") as zf:
        zf.writestr("MultiWOZ_2.1/data.json", json.dumps(MWOZ21))
        zf.writestr("MultiWOZ_2.1/valListFile.txt", "SNG0002.json\n")
        zf.writestr("MultiWOZ_2.1/testListFile.txt", "SNG0003.json\n")
        zf.writestr("__MACOSX/MultiWOZ_2.1/._data.json", "junk")
    root = download_multiwoz(tmp_path, "2.1")
    assert [d.id for d in load_dialogues(root, split="train")] == ["SNG0001"]
    assert [d.id for d in load_dialogues(root, split="test")] == ["SNG0003"]


# --------------------------------------------------------------------------- TFDS (array_record, no TensorFlow)


def test_tfds_array_record_roundtrip(
    data_dir: Path, tmp_path: Path, multiwoz_val: list[Dialogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    # tfds 4.9 leaves an empty mkdtemp() folder per new builder; keep it inside tmp_path.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    from reformer_jax.data.pipeline import load_tfds_dialogues, prepare_tfds_dialogues

    version_dir = prepare_tfds_dialogues(
        data_dir / "multiwoz", tmp_path, name="multiwoz21", splits=["validation"]
    )
    assert sorted(p.name for p in version_dir.glob("*.array_record*")) == [
        "reformer_dialogues-validation.array_record-00000-of-00001"
    ]
    loaded = load_tfds_dialogues(tmp_path, name="multiwoz21", split="dev")
    assert sorted(loaded, key=lambda d: d.id) == sorted(multiwoz_val, key=lambda d: d.id)
    assert "tensorflow" not in sys.modules
    with pytest.raises(FileNotFoundError, match="prepare_tfds_dialogues"):
        load_tfds_dialogues(tmp_path, name="sgd", split="train")
