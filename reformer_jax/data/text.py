"""Byte-level language-model data from a local text file.

Vocabulary: raw bytes, ids ``0..255`` (``BYTE_VOCAB_SIZE = 256``), no offset.
Training crops always have the full length, so no padding id is needed for
training; the only padded batches are the last evaluation batch of
:meth:`ByteTextSource.eval_batches`, where padding uses id 0 (the NUL byte,
absent from real text) with weight 0. Decode with :func:`decode_bytes`.

Supported files: plain text, ``.xz``, ``.gz``/``.gzip``, and tar archives
(``.tar``, ``.tar.xz``, ``.tar.gz``) whose members matching a glob are
concatenated in sorted name order, each followed by ``"\\n\\n\\n"``.

Split: by position (:func:`split_by_position`): train = the start, then
validation, then test, so no validation text is ever seen in training.
"""

from __future__ import annotations

import fnmatch
import gzip
import lzma
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BYTE_VOCAB_SIZE = 256
DOCUMENT_SEPARATOR = b"\n\n\n"


def load_text_bytes(path: str | os.PathLike[str], *, members: str = "*.txt") -> np.ndarray:
    """Reads a (compressed) text file or tar archive into ``uint8 [num_bytes]``.

    Args:
      path: the file.
      members: for tar archives, an fnmatch pattern on member paths.

    Raises:
      FileNotFoundError: missing file.
      ValueError: corrupt archive/compression, or no text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Text file {path} does not exist. Set the data path in the config or REFORMER_DATA_DIR."
        )
    name = path.name
    try:
        if ".tar" in name or name.endswith(".tgz"):
            raw = _read_tar(path, members)
        elif name.endswith(".xz"):
            with lzma.open(path, "rb") as f:
                raw = f.read()
        elif name.endswith((".gz", ".gzip")):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (lzma.LZMAError, gzip.BadGzipFile, tarfile.TarError, EOFError) as e:
        raise ValueError(f"{path}: cannot decompress ({type(e).__name__}: {e}); the file is corrupted.") from e
    if not raw:
        raise ValueError(f"{path}: no text (empty file or no member matching {members!r}).")
    return np.frombuffer(raw, dtype=np.uint8)


def _read_tar(path: Path, pattern: str) -> bytes:
    with tarfile.open(path, "r:*") as tar:
        chosen = sorted(
            (m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pattern)),
            key=lambda m: m.name,
        )
        if not chosen:
            raise ValueError(f"{path}: no tar member matches {pattern!r}.")
        parts = []
        for member in chosen:
            f = tar.extractfile(member)
            assert f is not None  # regular file
            parts.append(f.read())
            parts.append(DOCUMENT_SEPARATOR)
        return b"".join(parts)


def split_by_position(
    data: np.ndarray, *, validation_fraction: float = 0.1, test_fraction: float = 0.0
) -> dict[str, np.ndarray]:
    """Splits a byte array by position: ``train | validation | test``.

    Returns views ``{'train', 'validation'[, 'test']}``; e.g. tiny-shakespeare's
    usual split is ``validation_fraction=0.1``, enwik8-style is 0.05 + 0.05.
    """
    if not (0 <= validation_fraction and 0 <= test_fraction and validation_fraction + test_fraction < 1):
        raise ValueError(f"Bad split fractions {validation_fraction=} {test_fraction=}.")
    n = len(data)
    n_test = int(round(n * test_fraction))
    n_valid = int(round(n * validation_fraction))
    out = {"train": data[: n - n_valid - n_test], "validation": data[n - n_valid - n_test : n - n_test]}
    if test_fraction > 0:
        out["test"] = data[n - n_test :]
    return out


def decode_bytes(ids: np.ndarray | list[int]) -> str:
    """Byte ids -> text (invalid UTF-8 replaced)."""
    return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Rows ``[p*B/P, (p+1)*B/P)`` of the global batch that process ``p`` builds."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"Bad process_index={process_index} / process_count={process_count}.")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}."
        )
    per = global_batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


class ByteTextSource:
    """Random fixed-length crops of a byte array; a pipeline batch source.

    ``batch(step, ...)`` is a pure function of ``(seed, step)``: crop starts
    are ``np.random.default_rng([seed, step]).integers(0, N - length + 1,
    global_batch_size)``; process ``p`` takes rows ``[p*B/P, (p+1)*B/P)``.
    """

    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, data: np.ndarray, length: int):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError(f"Expected uint8 [N] bytes, got {data.dtype} {data.shape}.")
        if len(data) < length:
            raise ValueError(f"Text has {len(data)} bytes, fewer than the crop length {length}.")
        self.data = data
        self.length = length

    def __len__(self) -> int:
        """Number of distinct crop positions."""
        return len(self.data) - self.length + 1

    def crop_starts(self, step: int, *, seed: int, global_batch_size: int) -> np.ndarray:
        """Start offsets ``int64 [global_batch_size]`` for a step."""
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, len(self), size=global_batch_size)

    def batch(
        self, step: int, *, seed: int, global_batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """``{'inputs': int32 [B/P, L], 'weights': float32 [B/P, L] (all ones)}``."""
        rows = process_rows(global_batch_size, process_index, process_count)
        starts = self.crop_starts(step, seed=seed, global_batch_size=global_batch_size)[rows]
        inputs = self.data[starts[:, None] + np.arange(self.length)].astype(np.int32)
        return {"inputs": inputs, "weights": np.ones(inputs.shape, np.float32)}

    def eval_batches(
        self, *, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive non-overlapping chunks covering the whole text once.

        The tail is padded (id 0, weight 0); padding rows complete the last
        global batch. Yields the same dict layout as :meth:`batch`.
        """
        rows = process_rows(batch_size, process_index, process_count)
        n, length = len(self.data), self.length
        num_chunks = -(-n // length)
        padded = np.zeros(-(-num_chunks // batch_size) * batch_size * length, np.int32)
        padded[:n] = self.data
        weights = np.zeros(padded.shape, np.float32)
        weights[:n] = 1.0
        padded = padded.reshape(-1, batch_size, length)
        weights = weights.reshape(-1, batch_size, length)
        for inputs, w in zip(padded, weights):
            yield {"inputs": inputs[rows], "weights": w[rows]}
