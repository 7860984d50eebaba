"""Tests for tokenizers, byte-level text data and the batch pipeline.

Real-data tests use the staged corpora under the shared data dir
($REFORMER_DATA_DIR or <repo>/../shared/data) and skip when it is absent.
"""

from __future__ import annotations

import hashlib
import lzma
from pathlib import Path

import numpy as np
import pytest

from reformer_jax.data.dialogues import (
    SYSTEM,
    USER,
    Dialogue,
    format_dialogue_with_spans,
    iter_turn_segments,
    load_dialogues,
    resolve_data_dir,
)
from reformer_jax.data.pipeline import DialogueExamples, batch_indices, encode_dialogue, make_batches
from reformer_jax.data.text import ByteTextSource, decode_bytes, load_text_bytes, split_by_position
from reformer_jax.data.tokenizer import EOS_ID, PAD_ID, ByteTokenizer, SentencePieceTokenizer, load_or_train_tokenizer

TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_CONCAT_SHA256 = "e1d2e18ac43deb31b3e5d9717ab4783be810a9c5cd0e7cb2c83797d39757bac8"


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


@pytest.fixture(scope="module")
def sp_tokenizer(multiwoz_val: list[Dialogue], tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    workdir = tmp_path_factory.mktemp("run")
    return load_or_train_tokenizer(workdir, 1000, lambda: iter_turn_segments(multiwoz_val))


@pytest.fixture(scope="module")
def tiny_shakespeare(data_dir: Path) -> np.ndarray:
    path = data_dir / "tinyshakespeare" / "input.txt.gz"
    if not path.is_file():
        pytest.skip("tinyshakespeare not staged")
    return load_text_bytes(path)


def _toy_dialogue() -> Dialogue:
    return Dialogue("toy", [
        (USER, "I want a cheap hotel ."),
        (SYSTEM, "The Allenbell is cheap ."),
        (USER, "Book it, merci beaucoup — café!"),
        (SYSTEM, "Booked ; ref 12AB ."),
    ])


# --------------------------------------------------------------------------- tokenizers


def test_sentencepiece_train_save_resume(sp_tokenizer: SentencePieceTokenizer) -> None:
    workdir = sp_tokenizer.path.parent
    assert sp_tokenizer.path == workdir / "tokenizer.model" and sp_tokenizer.path.is_file()
    assert sp_tokenizer.vocab_size == 1000
    assert (sp_tokenizer.sp.pad_id(), sp_tokenizer.sp.eos_id()) == (PAD_ID, EOS_ID) == (0, 1)

    def must_not_train() -> list[str]:
        raise AssertionError("resume retrained the tokenizer")

    again = load_or_train_tokenizer(workdir, 1000, must_not_train)
    text = "Person 2: I can help you with that . What is your price range ?"
    assert again.encode(text) == sp_tokenizer.encode(text)
    assert again.decode(again.encode(text) + [EOS_ID, PAD_ID]) == text
    mismatch = r"tokenizer\.model was trained for vocab_size=1000 .* asks for vocab_size=2000"
    with pytest.raises(ValueError, match=mismatch):
        load_or_train_tokenizer(workdir, 2000, must_not_train)


def test_sentencepiece_soft_vocab_limit_resume(multiwoz_val: list[Dialogue], tmp_path: Path) -> None:
    segments = list(iter_turn_segments(multiwoz_val[:200]))
    tok = load_or_train_tokenizer(tmp_path, 6000, segments)
    assert tok.vocab_size < 6000  # hard_vocab_limit=False on a small corpus
    assert load_or_train_tokenizer(tmp_path, 6000, []).vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="Set vocab_size=6000"):
        load_or_train_tokenizer(tmp_path, tok.vocab_size, [])
    with pytest.raises(ValueError, match="empty"):
        load_or_train_tokenizer(tmp_path / "other", 100, [])


def test_byte_tokenizer_roundtrip_and_offsets() -> None:
    tok = ByteTokenizer()
    text = "café — ok"
    ids, ends = tok.encode_with_offsets(text)
    assert tok.vocab_size == 258 and ids.min() >= 2
    assert tok.decode(list(ids) + [EOS_ID, PAD_ID]) == text
    assert ends[-1] == len(text.encode()) and len(ids) == len(text.encode())


# --------------------------------------------------------------------------- dialogue examples


@pytest.mark.parametrize("tokenizer_name", ["bytes", "sentencepiece"])
def test_reply_mask_covers_exactly_person2_text(tokenizer_name: str, request: pytest.FixtureRequest) -> None:
    tok = ByteTokenizer() if tokenizer_name == "bytes" else request.getfixturevalue("sp_tokenizer")
    dialogue = _toy_dialogue()
    ids, reply, turn_starts = encode_dialogue(dialogue, tok)
    text, spans = format_dialogue_with_spans(dialogue)
    if tokenizer_name == "bytes":
        # Every byte of " <system utterance>" after "Person 2:" is a reply token, nothing else is.
        expected = np.zeros(len(text.encode()), bool)
        for s in spans:
            if s.speaker == SYSTEM:
                lo, hi = len(text[: s.text_start - 1].encode()), len(text[: s.end].encode())
                expected[lo:hi] = True
        np.testing.assert_array_equal(reply, expected)
    reply_text = tok.decode(ids[reply])
    assert reply_text.replace(" ", "") == "TheAllenbellischeap.Booked;ref12AB."
    for k, s in enumerate(spans):  # each turn starts at its "Person k:" label
        end = turn_starts[k + 1] if k + 1 < len(spans) else len(ids)
        assert tok.decode(ids[turn_starts[k] : end]).strip() == text[s.start : s.end]


def test_reply_only_weights_zero_on_person1_real_data(
    multiwoz_val: list[Dialogue], sp_tokenizer: SentencePieceTokenizer
) -> None:
    examples = DialogueExamples.build(multiwoz_val, sp_tokenizer, 512, loss_on="replies")
    batch = examples.batch(5, seed=3, global_batch_size=8)
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
    assert batch["inputs"].shape == batch["weights"].shape == (8, 512)
    assert [sp_tokenizer.sp.id_to_piece(i) for i in sp_tokenizer.encode("Person 1:")] == ["▁Person", "▁1:"]
    checked = 0
    for row, w in zip(batch["inputs"], batch["weights"]):
        real = row[row != PAD_ID]
        assert real[-1] == EOS_ID and np.all(w[len(real) :] == 0)
        # Walk the turns: weight 0 from each "Person 1:" label up to the next "Person 2:" label.
        text_pieces = [sp_tokenizer.sp.id_to_piece(int(i)) for i in real]
        speaker = None
        for t, piece in enumerate(text_pieces):
            if piece == "▁Person" and t + 1 < len(real) and text_pieces[t + 1] in ("▁1:", "▁2:"):
                speaker = text_pieces[t + 1]
                assert w[t] == 0 and w[t + 1] == 0  # labels never weighted
            elif speaker == "▁1:":
                assert w[t] == 0, sp_tokenizer.decode(real[max(0, t - 10) : t + 1])
                checked += 1
            elif speaker == "▁2:" and real[t] != EOS_ID and text_pieces[t - 1] != "▁Person":
                assert w[t] == 1
    assert checked > 100
    full = examples.with_loss_on("all").batch(5, seed=3, global_batch_size=8)
    np.testing.assert_array_equal(full["inputs"], batch["inputs"])
    np.testing.assert_array_equal(full["weights"], (batch["inputs"] != PAD_ID).astype(np.float32))


def test_left_truncation_keeps_newest_whole_turns() -> None:
    tok = ByteTokenizer()
    dialogue = Dialogue("long", [(USER if i % 2 == 0 else SYSTEM, f"turn number {i} " + "x" * 20) for i in range(10)])
    full_text = tok.encode(" ".join(
        f"Person {1 + i % 2}: turn number {i} " + "x" * 20 for i in range(10)
    ))
    examples = DialogueExamples.build([dialogue], tok, 150)
    assert examples.stats["truncated"] == 1 and len(examples) == 1
    row = examples.rows(np.array([0]))["inputs"][0]
    real = row[row != PAD_ID]
    assert real[-1] == EOS_ID and len(real) <= 150
    kept = tok.decode(real[:-1])
    assert kept.startswith("Person ") and kept.endswith("turn number 9 " + "x" * 20)
    assert tok.decode(full_text).endswith(kept)
    # 3 newest turns (44 chars each + separators) + EOS = 135 <= 150; a 4th would need 180.
    assert kept == " ".join(f"Person {1 + i % 2}: turn number {i} " + "x" * 20 for i in (7, 8, 9))
    dropped = DialogueExamples.build([dialogue, _toy_dialogue()], tok, 150, truncate="drop")
    assert dropped.stats["dropped"] == 1 and len(dropped) == 1
    with pytest.raises(ValueError, match="increase the sequence length"):
        DialogueExamples.build([dialogue], tok, 20)


# --------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def byte_examples(multiwoz_val: list[Dialogue]) -> DialogueExamples:
    return DialogueExamples.build(multiwoz_val, ByteTokenizer(), 1024, loss_on="replies")


def test_batches_are_pure_function_of_seed_and_step(byte_examples: DialogueExamples) -> None:
    run = list(make_batches(byte_examples, seed=7, global_batch_size=16, num_steps=12))
    resumed = list(make_batches(byte_examples, seed=7, global_batch_size=16, start_step=9, num_steps=3))
    for a, b in zip(run[9:], resumed):
        for key in ("inputs", "weights"):
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(run[0]["inputs"], run[1]["inputs"])
    other_seed = byte_examples.batch(0, seed=8, global_batch_size=16)
    assert not np.array_equal(run[0]["inputs"], other_seed["inputs"])
    prefetched = list(make_batches(byte_examples, seed=7, global_batch_size=16, num_steps=12, prefetch=4))
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(run, prefetched))


def test_epoch_covers_every_example_once() -> None:
    n, batch = 50, 8  # batches straddle epoch boundaries
    stream = np.concatenate([batch_indices(3, s, batch, n) for s in range(25)])  # 200 = 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])  # reshuffled per epoch


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_partition_global_batch(
    byte_examples: DialogueExamples, tiny_shakespeare: np.ndarray, process_count: int
) -> None:
    text = ByteTextSource(tiny_shakespeare, 64)
    for source in (byte_examples, text):
        whole = source.batch(11, seed=1, global_batch_size=8)
        parts = [
            source.batch(11, seed=1, global_batch_size=8, process_index=p, process_count=process_count)
            for p in range(process_count)
        ]
        assert all(p["inputs"].shape[0] == 8 // process_count for p in parts)
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(ValueError, match="not divisible"):
        next(make_batches(byte_examples, seed=0, global_batch_size=6, process_count=4))


def test_packing_and_eval_batches(multiwoz_val: list[Dialogue]) -> None:
    tok = ByteTokenizer()
    plain = DialogueExamples.build(multiwoz_val[:100], tok, 4096)
    packed = DialogueExamples.build(multiwoz_val[:100], tok, 4096, pack=True)
    assert packed.stats["tokens"] == plain.stats["tokens"] and len(packed) < len(plain)
    assert packed.stats["fill"] > 0.85 > plain.stats["fill"]
    batch = packed.batch(0, seed=0, global_batch_size=4)
    seg, pos, inputs = batch["segment_ids"], batch["positions"], batch["inputs"]
    assert seg.max() >= 2
    for r in range(4):
        for k in range(1, seg[r].max() + 1):
            where = np.flatnonzero(seg[r] == k)
            np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))
            assert inputs[r, where[-1]] == EOS_ID and tok.decode(inputs[r, where[:9]]) == "Person 1:"
    assert np.all((seg == 0) == (batch["weights"] == 0))
    seen = [row for b in plain.eval_batches(batch_size=16) for row, w in zip(b["inputs"], b["weights"]) if w.any()]
    assert len(seen) == len(plain) == 100


# --------------------------------------------------------------------------- byte text


def test_tiny_shakespeare_bytes_and_split(tiny_shakespeare: np.ndarray) -> None:
    assert len(tiny_shakespeare) == 1_115_394
    assert hashlib.sha256(tiny_shakespeare.tobytes()).hexdigest() == TINY_SHAKESPEARE_SHA256
    assert decode_bytes(tiny_shakespeare[:14]) == "First Citizen:"
    splits = split_by_position(tiny_shakespeare, validation_fraction=0.1)
    assert len(splits["validation"]) == 111_539 and len(splits["train"]) + 111_539 == 1_115_394
    assert splits["train"].base is not None  # views, no copy
    np.testing.assert_array_equal(np.concatenate([splits["train"], splits["validation"]]), tiny_shakespeare)


def test_text_crops_deterministic_and_real(tiny_shakespeare: np.ndarray) -> None:
    source = ByteTextSource(split_by_position(tiny_shakespeare)["train"], 256)
    batch = source.batch(42, seed=0, global_batch_size=8)
    assert batch["inputs"].shape == (8, 256) and batch["inputs"].dtype == np.int32
    assert np.all(batch["weights"] == 1) and batch["inputs"].max() < 256
    starts = source.crop_starts(42, seed=0, global_batch_size=8)
    for row, s in zip(batch["inputs"], starts):
        np.testing.assert_array_equal(row, source.data[s : s + 256])
    np.testing.assert_array_equal(source.batch(42, seed=0, global_batch_size=8)["inputs"], batch["inputs"])
    assert not np.array_equal(source.batch(43, seed=0, global_batch_size=8)["inputs"], batch["inputs"])
    evals = list(ByteTextSource(tiny_shakespeare[:10_000], 512).eval_batches(batch_size=4))
    assert sum(float(b["weights"].sum()) for b in evals) == 10_000
    flat = np.concatenate([b["inputs"].reshape(-1) for b in evals])
    np.testing.assert_array_equal(flat[:10_000], tiny_shakespeare[:10_000])
    assert np.all(flat[10_000:] == PAD_ID)


def test_open_shakespeare_tar_matches_concatenation(data_dir: Path) -> None:
    folder = data_dir / "open_shakespeare"
    if not folder.is_dir():
        pytest.skip("open_shakespeare not staged")
    concat = load_text_bytes(folder / "shakespeare_gut_concat.txt.xz")
    assert hashlib.sha256(concat.tobytes()).hexdigest() == SHAKESPEARE_CONCAT_SHA256
    from_tar = load_text_bytes(folder / "open_shakespeare_0.6_texts.tar.xz", members="shksprdata/texts/*_gut.txt")
    # Same 42 texts in the same order; the staged concatenation ends with one "\n" fewer.
    assert len(from_tar) == len(concat) + 1 and from_tar[-1] == ord("\n")
    np.testing.assert_array_equal(from_tar[: len(concat)], concat)


def test_text_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_bytes(tmp_path / "missing.txt")
    bad = tmp_path / "broken.txt.xz"
    bad.write_bytes(lzma.compress(b"hello world" * 100)[:30])
    with pytest.raises(ValueError, match=r"broken\.txt\.xz: cannot decompress"):
        load_text_bytes(bad)
    with pytest.raises(ValueError, match="fewer than the crop length"):
        ByteTextSource(np.zeros(10, np.uint8), 64)
