"""Tokenizers: a trained SentencePiece model and a byte-level fallback.

Special ids (both tokenizers):

* ``PAD_ID = 0`` -- padding; batches carry weight 0 there.
* ``EOS_ID = 1`` -- end of an example (appended by the pipeline).
* ``UNK_ID = 2`` -- SentencePiece unknown piece (rare: ``byte_fallback`` is on
  by default). The byte tokenizer has no unknowns; id 2 is byte 0x00.

SentencePiece has no BOS piece. :class:`ByteTokenizer` maps byte ``b`` to id
``b + 2`` (vocab 258).

Resume: :func:`load_or_train_tokenizer` trains once from an in-memory text
iterator, writes ``<workdir>/tokenizer.model`` (and a small
``tokenizer.meta.json`` recording the *requested* vocab size, because with
``hard_vocab_limit=False`` SentencePiece may produce fewer pieces), and later
reuses the file. A configured vocab size that differs from the one the
existing model was trained for raises ``ValueError``.

Offsets: ``encode_with_offsets`` returns, per token, the UTF-8 *byte* offset
just past the token's last byte; the pipeline uses it to map tokens to the
character spans of dialogue turns.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
TOKENIZER_FILENAME = "tokenizer.model"
META_FILENAME = "tokenizer.meta.json"


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of ids (all ids are in ``[0, vocab_size)``)."""

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no EOS)."""

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; PAD and EOS are dropped."""

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(ids int32 [n], ends int64 [n])``; ``ends`` are UTF-8 byte offsets."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 2 (0 = pad, 1 = eos), vocab 258."""

    OFFSET = 2

    @property
    def vocab_size(self) -> int:
        return 256 + self.OFFSET

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.OFFSET).tolist()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        arr = arr[arr >= self.OFFSET] - self.OFFSET
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.OFFSET
        return ids, np.arange(1, len(ids) + 1, dtype=np.int64)


class SentencePieceTokenizer:
    """Wraps a ``sentencepiece.SentencePieceProcessor`` (pad=0, eos=1, unk=2)."""

    def __init__(self, model: str | os.PathLike[str] | bytes):
        import sentencepiece as spm

        if isinstance(model, bytes):
            self.sp = spm.SentencePieceProcessor(model_proto=model)
            self.path: Path | None = None
        else:
            self.path = Path(model)
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        if (self.sp.pad_id(), self.sp.eos_id()) != (PAD_ID, EOS_ID):
            raise ValueError(
                f"Tokenizer {self.path or '<bytes>'} has pad={self.sp.pad_id()} eos={self.sp.eos_id()}; "
                f"this code needs pad={PAD_ID} eos={EOS_ID}. Delete it to retrain."
            )

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.sp.decode([int(i) for i in ids if i not in (PAD_ID, EOS_ID)])

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        pieces = self.sp.encode(text, out_type="proto").pieces
        ids = np.fromiter((p.id for p in pieces), np.int32, len(pieces))
        ends = np.fromiter((p.end for p in pieces), np.int64, len(pieces))
        return ids, ends


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    input_sentence_size: int = 2_000_000,
    max_sentence_length: int = 16384,
    num_threads: int | None = None,
    **extra_options: object,
) -> bytes:
    """Trains SentencePiece on an in-memory iterator of sentences.

    ``hard_vocab_limit=False``: the result may have fewer than ``vocab_size``
    pieces on a small corpus (never more). Returns the serialized model.
    """
    import sentencepiece as spm

    if vocab_size < 8:
        raise ValueError(f"vocab_size={vocab_size} is too small.")
    writer = io.BytesIO()
    sentences = (text for text in texts if text)
    first = next(sentences, None)
    if first is None:
        raise ValueError("No training text for the tokenizer (the text iterator was empty).")
    spm.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain([first], sentences),
        model_writer=writer,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
        **extra_options,
    )
    return writer.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_or_train_tokenizer(
    workdir: str | os.PathLike[str],
    vocab_size: int,
    texts: Iterable[str] | Callable[[], Iterable[str]],
    **train_options: object,
) -> SentencePieceTokenizer:
    """Loads ``<workdir>/tokenizer.model`` or trains and saves it.

    Args:
      workdir: run directory (created if missing).
      vocab_size: configured vocab size (the model's embedding size must be at
        least this; the tokenizer may use fewer ids, see ``vocab_size`` of the
        result).
      texts: training sentences, or a zero-argument callable returning them
        (so that resuming does not load the corpus).
      **train_options: passed to :func:`train_sentencepiece`.

    Raises:
      ValueError: an existing tokenizer was trained for a different vocab size
        (message says how to fix), or the training text is empty.

    Multi-host: run it on one process (or before launch) and share ``workdir``;
    training is not guaranteed to be bit-identical across machines.
    """
    workdir = Path(workdir)
    model_path = workdir / TOKENIZER_FILENAME
    meta_path = workdir / META_FILENAME
    if model_path.is_file():
        tokenizer = SentencePieceTokenizer(model_path)
        trained_for = _trained_vocab_size(model_path, meta_path, tokenizer)
        if trained_for != vocab_size:
            raise ValueError(
                f"{model_path} was trained for vocab_size={trained_for} ({tokenizer.vocab_size} pieces) "
                f"but the config asks for vocab_size={vocab_size}. Set vocab_size={trained_for} to "
                f"resume this run, or delete {model_path} (and {meta_path.name}) to retrain."
            )
        logger.info("Reusing tokenizer %s (%d pieces).", model_path, tokenizer.vocab_size)
        return tokenizer

    if callable(texts):
        texts = texts()
    proto = train_sentencepiece(texts, vocab_size, **train_options)
    workdir.mkdir(parents=True, exist_ok=True)
    _atomic_write(model_path, proto)
    tokenizer = SentencePieceTokenizer(model_path)
    meta = {
        "requested_vocab_size": vocab_size,
        "pieces": tokenizer.vocab_size,
        "sha256": hashlib.sha256(proto).hexdigest(),
        "pad_id": PAD_ID,
        "eos_id": EOS_ID,
        "unk_id": UNK_ID,
    }
    _atomic_write(meta_path, json.dumps(meta, indent=1).encode())
    if tokenizer.vocab_size < vocab_size:
        logger.warning(
            "Tokenizer has %d pieces, fewer than vocab_size=%d (soft limit, small corpus).",
            tokenizer.vocab_size, vocab_size,
        )
    logger.info("Trained tokenizer %s (%d pieces).", model_path, tokenizer.vocab_size)
    return tokenizer


def _trained_vocab_size(model_path: Path, meta_path: Path, tokenizer: SentencePieceTokenizer) -> int:
    """Vocab size the model was trained for: from the meta file if it matches, else the piece count."""
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") == hashlib.sha256(model_path.read_bytes()).hexdigest():
            return int(meta["requested_vocab_size"])
        logger.warning("%s does not describe %s (sha256 differs); using the piece count.", meta_path, model_path)
    return tokenizer.vocab_size
