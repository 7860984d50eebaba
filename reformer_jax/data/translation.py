"""Parallel text for the encoder-decoder (Multi30k): sentence pairs and padded batches.

Multi30k ships one gzip file per split and language (``train.de.gz``, ``val.en.gz``,
``test_2016_flickr.en.gz``, ...); line *i* of every language file of a split is the same
caption. Source and target share one sentencepiece vocabulary (trained on both sides of the
training split). Every sentence ends with EOS; rows are padded with PAD (0) to fixed lengths.

Batches (see :class:`TranslationExamples`)::

    {'src':     int32 [B, S]    source ids, EOS-terminated, PAD after,
     'inputs':  int32 [B, T]    target ids, EOS-terminated (the sequence the decoder models;
                                the trainer shifts it right for teacher forcing), PAD after,
     'weights': float32 [B, T]  1.0 at target tokens (EOS included), 0.0 at padding}
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import lzma
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .pipeline import IndexedRows, length_grouped_indices, process_rows
from .tokenizer import EOS_ID, PAD_ID, Tokenizer

logger = logging.getLogger(__name__)

# Split names as people say them -> Multi30k's file stems.
SPLIT_ALIASES = {"validation": "val", "dev": "val", "test": "test_2016_flickr"}


def split_stem(split: str) -> str:
    """'validation' -> 'val', 'test' -> 'test_2016_flickr'; Multi30k's own names pass through."""
    return SPLIT_ALIASES.get(split, split)


def _read_lines(directory: Path, stem: str, lang: str) -> list[str]:
    for suffix, opener in ((".gz", gzip.open), (".xz", lzma.open), ("", open)):
        path = directory / f"{stem}.{lang}{suffix}"
        if path.is_file():
            with opener(path, "rt", encoding="utf-8") as f:
                return [line.rstrip("\n").strip() for line in f]
    available = sorted(p.name for p in directory.glob("*")) if directory.is_dir() else []
    raise FileNotFoundError(
        f"No {stem}.{lang}[.gz|.xz] in {directory} (found: {', '.join(available[:12]) or 'nothing'}). "
        f"Check config.data.train_split/eval_split (Multi30k: train, val, test_2016_flickr, ...) "
        f"and data.src_lang/tgt_lang (en, de, fr, cs), or point data.data_dir at the data."
    )


def load_parallel(directory: str | os.PathLike[str], split: str, src_lang: str,
                  tgt_lang: str) -> list[tuple[str, str]]:
    """Sentence pairs ``(source, target)`` of a split; the ``raw/`` subfolder is looked in too.

    Raises if the two sides have different line counts (mismatched files would silently pair
    the wrong sentences) or a file is missing.
    """
    directory, stem = Path(directory), split_stem(split)
    if not any(directory.glob(f"{stem}.{src_lang}*")) and (directory / "raw").is_dir():
        directory = directory / "raw"
    src, tgt = _read_lines(directory, stem, src_lang), _read_lines(directory, stem, tgt_lang)
    if len(src) != len(tgt):
        raise ValueError(f"{directory}/{stem}: {len(src)} {src_lang} lines but {len(tgt)} {tgt_lang} "
                         f"lines; the files of a split must be line-aligned.")
    pairs = [(s, t) for s, t in zip(src, tgt) if s and t]
    if not pairs:
        raise ValueError(f"{directory}/{stem}.{src_lang}/{tgt_lang}: no non-empty sentence pairs.")
    return pairs


def _encode(ids: Sequence[int], length: int) -> np.ndarray:
    """EOS-terminated, PAD-filled row of ``length``; long sentences keep their first tokens."""
    ids = list(ids)[: length - 1] + [EOS_ID]
    row = np.full(length, PAD_ID, np.int32)
    row[: len(ids)] = ids
    return row


@dataclasses.dataclass
class TranslationExamples(IndexedRows):
    """Tokenized sentence pairs as padded arrays (``src [N, S]``, ``tgt [N, T]``)."""

    src: np.ndarray
    tgt: np.ndarray
    references: list[str]          # the raw target sentences (for BLEU)
    sources: list[str]             # the raw source sentences
    stats: dict[str, int | float]
    widths: tuple[int, ...] = ()       # training batches: rows of similar length, cut to a width
    lengths: np.ndarray | None = None  # with widths, int32 [N]: max(source, target) tokens + EOS

    @classmethod
    def build(cls, pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, *, src_len: int,
              tgt_len: int) -> TranslationExamples:
        """Encodes ``pairs``; sentences longer than ``src_len``/``tgt_len - 1`` tokens are cut
        (counted in ``stats``; evaluation still scores against the full reference)."""
        if src_len < 2 or tgt_len < 2:
            raise ValueError(f"src_len={src_len} and tgt_len={tgt_len} must be >= 2 (tokens + EOS).")
        n = len(pairs)
        src = np.full((n, src_len), PAD_ID, np.int32)
        tgt = np.full((n, tgt_len), PAD_ID, np.int32)
        cut_src = cut_tgt = 0
        lengths = []
        encode = getattr(tokenizer, "encode_batch", None)
        src_ids = encode([s for s, _ in pairs]) if encode else [tokenizer.encode(s) for s, _ in pairs]
        tgt_ids = encode([t for _, t in pairs]) if encode else [tokenizer.encode(t) for _, t in pairs]
        for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
            cut_src += len(s) + 1 > src_len
            cut_tgt += len(t) + 1 > tgt_len
            lengths.append(len(t) + 1)
            src[i] = _encode(s, src_len)
            tgt[i] = _encode(t, tgt_len)
        stats = {"pairs": n, "truncated_sources": cut_src, "truncated_targets": cut_tgt,
                 "mean_target_tokens": float(np.mean(lengths)) if lengths else 0.0}
        if cut_src or cut_tgt:
            logger.info("src_len=%d, tgt_len=%d: truncated %d sources and %d targets of %d pairs.",
                        src_len, tgt_len, cut_src, cut_tgt, n)
        return cls(src=src, tgt=tgt, references=[t for _, t in pairs],
                   sources=[s for s, _ in pairs], stats=stats)

    def with_widths(self, widths: Sequence[int]) -> TranslationExamples:
        """The same pairs, with training batches of similar-length rows cut to the smallest of
        ``widths`` that holds their longest row (one compiled step per width; () = off)."""
        widths = tuple(sorted(int(w) for w in widths))
        if widths and (widths[0] < 2 or widths[-1] < max(self.src.shape[1], self.tgt.shape[1])):
            raise ValueError(f"length buckets {widths}: each must be >= 2 and the largest >= the "
                             f"row lengths (src {self.src.shape[1]}, tgt {self.tgt.shape[1]}).")
        lengths = np.maximum((self.src != PAD_ID).sum(1), (self.tgt != PAD_ID).sum(1))
        return dataclasses.replace(self, widths=widths, lengths=lengths.astype(np.int32))

    def batch(self, step: int, *, seed: int, global_batch_size: int, process_index: int = 0,
              process_count: int = 1) -> dict[str, np.ndarray]:
        """Local rows of ``step``'s global batch: as :class:`IndexedRows` without ``widths``;
        with them, rows of similar length (:func:`length_grouped_indices`) cut to one width."""
        if not self.widths:
            return super().batch(step, seed=seed, global_batch_size=global_batch_size,
                                 process_index=process_index, process_count=process_count)
        indices = length_grouped_indices(seed, step, global_batch_size, self.lengths)
        width = next(w for w in self.widths if w >= self.lengths[indices].max())
        rows = self.rows(indices[process_rows(global_batch_size, process_index, process_count)])
        return {k: v[:, :width] for k, v in rows.items()}

    def __len__(self) -> int:
        return len(self.src)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """``{'src', 'inputs', 'weights'}`` rows for the given example indices."""
        tgt = self.tgt[indices]
        return {"src": self.src[indices], "inputs": tgt, "weights": (tgt != PAD_ID).astype(np.float32)}
