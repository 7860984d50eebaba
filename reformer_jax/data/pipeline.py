"""Training batches whose order is a pure function of ``(seed, step)``.

Contract used by the trainer::

    source = DialogueExamples.build(dialogues, tokenizer, length=L, loss_on="replies")
    # or: source = ByteTextSource(bytes_array, length=L)
    for batch in make_batches(source, seed=0, global_batch_size=B, start_step=step,
                              process_index=jax.process_index(),
                              process_count=jax.process_count()):
        batch["inputs"]   # int32   [B / process_count, L]; pad id 0
        batch["weights"]  # float32 [B / process_count, L]; 0 on padding (and on
                          # non-reply tokens with loss_on="replies")

``weights[b, t]`` is the loss weight of *target* token ``inputs[b, t]`` (for a
decoder-only LM the model input is ``inputs`` shifted right by one). With
``pack=True`` batches also carry ``segment_ids`` (int32, 1-based per packed
example, 0 on padding) and ``positions`` (int32, position inside its example).

Resume: the rows of step ``s`` are examples ``perm_e[(s*B + j) mod N]`` for
``j < B``, where epoch ``e = (s*B + j) // N`` and ``perm_e =
np.random.default_rng([seed, e]).permutation(N)``. No iterator state needs to
be saved: ``make_batches(..., start_step=s)`` continues exactly. Every
example is seen once per epoch. Process ``p`` of ``P`` builds only rows
``[p*B/P, (p+1)*B/P)`` of the global batch. This assumes the example set is
rebuilt identically on resume (same files, tokenizer, length, packing seed).

Dialogue examples: each dialogue is formatted as ``"Person 1: ... Person 2:
..."`` plus EOS (id 1). A dialogue longer than ``L`` tokens keeps its newest
whole turns (left truncation at turn boundaries, ``truncate="turns"``) or is
dropped (``truncate="drop"``); if even its last turn does not fit it is
dropped. Shorter ones are right-padded with id 0.

Optional TFDS storage (no TensorFlow needed): :func:`prepare_tfds_dialogues`
writes a dialogue corpus as an ``array_record`` TFDS dataset and
:func:`load_tfds_dialogues` reads it back through ``as_data_source``.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .dialogues import SYSTEM, USER, Dialogue, canonical_split, format_dialogue_with_spans, load_dialogues
from .text import process_rows
from .tokenizer import EOS_ID, PAD_ID, Tokenizer

logger = logging.getLogger(__name__)

LOSS_ON = ("all", "replies")
TRUNCATE = ("turns", "drop")


class BatchSource(Protocol):
    """Anything :func:`make_batches` can draw from (DialogueExamples, ByteTextSource)."""

    def batch(
        self, step: int, *, seed: int, global_batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """The local rows of the global batch for ``step``."""


# --------------------------------------------------------------------------- order


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def batch_indices(seed: int, step: int, global_batch_size: int, num_examples: int) -> np.ndarray:
    """Example indices ``int64 [global_batch_size]`` of the global batch at ``step``.

    Position ``q = step * B + j`` of the infinite stream maps to
    ``perm_{q // N}[q % N]`` with a fresh seeded permutation per epoch.
    """
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0 (got {step=}, {seed=}).")
    if num_examples <= 0:
        raise ValueError("No examples to draw batches from.")
    q = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    epochs, within = np.divmod(q, num_examples)
    out = np.empty(global_batch_size, np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _epoch_permutation(seed, int(epoch), num_examples)[within[sel]]
    return out


def length_grouped_indices(seed: int, step: int, global_batch_size: int, lengths: np.ndarray,
                           group_batches: int = 32) -> np.ndarray:
    """Example indices ``int64 [global_batch_size]`` of ``step``'s batch, rows of similar length.

    Steps come in groups of ``group_batches``: a group takes the same ``group_batches x B``
    stream positions :func:`batch_indices` would (every example once per epoch), sorts them by
    ``lengths`` and hands its batches out in a seeded order, so a batch can be cut to the width
    of its longest row with little padding ("sortish" batching).
    """
    group, slot = divmod(step, group_batches)
    idx = batch_indices(seed, group, global_batch_size * group_batches, len(lengths))
    batches = idx[np.argsort(lengths[idx], kind="stable")].reshape(group_batches, global_batch_size)
    return batches[np.random.default_rng([seed, group, 1]).permutation(group_batches)[slot]]


# --------------------------------------------------------------------------- encoding


def _char_to_byte_offsets(text: str) -> np.ndarray:
    """``int64 [len(text) + 1]``: byte offset of each character index in UTF-8."""
    if text.isascii():
        return np.arange(len(text) + 1, dtype=np.int64)
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    widths = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])


def encode_dialogue(dialogue: Dialogue, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenizes a formatted dialogue.

    Returns:
      ids: int32 [n] token ids (no EOS).
      reply: bool [n], True for tokens of a Person 2 (system) utterance,
        including the space after ``"Person 2:"`` (what a model prompted
        with ``"... Person 2:"`` must generate); the label and the space
        separating turns are not reply tokens.
      turn_starts: int64 [num_turns], index of the first token of each turn.
    """
    text, spans = format_dialogue_with_spans(dialogue)
    ids, ends = tokenizer.encode_with_offsets(text)
    to_bytes = _char_to_byte_offsets(text)
    starts_b = to_bytes[[s.start for s in spans]]
    last_byte = np.maximum(ends - 1, 0)
    turn_of_token = np.searchsorted(starts_b, last_byte, side="right") - 1
    is_system = np.array([s.speaker == SYSTEM for s in spans])
    # The reply starts at the space after "Person 2:": a model prompted with "... Person 2:"
    # generates " <utterance>", and SentencePiece may emit that space as its own "▁" piece.
    reply_start_b = to_bytes[[s.text_start - 1 for s in spans]]
    end_b = to_bytes[[s.end for s in spans]]
    in_utterance = (last_byte >= reply_start_b[turn_of_token]) & (last_byte < end_b[turn_of_token])
    reply = is_system[turn_of_token] & in_utterance
    turn_starts = np.searchsorted(turn_of_token, np.arange(len(spans)), side="left")
    return ids.astype(np.int32), reply, turn_starts


def _fit_example(
    ids: np.ndarray, reply: np.ndarray, turn_starts: np.ndarray, length: int, truncate: str
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """Appends EOS and applies the length policy; returns None to drop."""
    ids = np.append(ids, np.int32(EOS_ID))
    reply = np.append(reply, reply[-1] if len(reply) else False)
    if len(ids) <= length:
        return ids, reply, False
    if truncate == "drop":
        return None
    fits = np.flatnonzero(len(ids) - turn_starts <= length)
    if len(fits) == 0:
        return None
    cut = int(turn_starts[fits[0]])
    return ids[cut:], reply[cut:], True


class IndexedRows:
    """A batch source of ``len(self)`` examples read by ``self.rows(indices)``: the training batch
    of a step is a seeded permutation's slice; evaluation walks every example once."""

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(
        self, step: int, *, seed: int, global_batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """Local rows of the global batch of ``step`` (a seeded permutation per epoch)."""
        rows = process_rows(global_batch_size, process_index, process_count)
        return self.rows(batch_indices(seed, step, global_batch_size, len(self))[rows])

    def eval_batches(
        self, *, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, in order; the last global batch is padded with all-zero rows."""
        rows = process_rows(batch_size, process_index, process_count)
        for start in range(0, len(self), batch_size):
            indices = np.arange(start, start + batch_size)[rows]
            real = indices[indices < len(self)]
            out = self.rows(real)
            if len(real) < len(indices):
                pad = len(indices) - len(real)
                out = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in out.items()}
            yield out


@dataclasses.dataclass(eq=False)
class DialogueExamples(IndexedRows):
    """Tokenized (optionally packed) dialogue rows stored flat; a batch source.

    Row ``i`` is ``tokens[offsets[i]:offsets[i+1]]`` (length <= ``length``).

    Attributes:
      tokens: int32 [T] all rows concatenated.
      reply: bool [T] reply-token mask (Person 2 utterances and their EOS).
      offsets: int64 [N + 1] row boundaries.
      length: L, the row length of batches.
      loss_on: ``"all"`` (weights 1 on every real token) or ``"replies"``.
      segment_ids / positions: int32 [T] when packed, else None.
      stats: counts from :meth:`build` (dialogues, truncated, dropped, rows...).
    """

    tokens: np.ndarray
    reply: np.ndarray
    offsets: np.ndarray
    length: int
    loss_on: str = "all"
    segment_ids: np.ndarray | None = None
    positions: np.ndarray | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={self.loss_on!r}; use one of {LOSS_ON}.")

    @classmethod
    def build(
        cls,
        dialogues: Sequence[Dialogue],
        tokenizer: Tokenizer,
        length: int,
        *,
        loss_on: str = "all",
        truncate: str = "turns",
        pack: bool = False,
        pack_seed: int = 0,
    ) -> DialogueExamples:
        """Tokenizes dialogues, applies the length policy and optional packing.

        Args:
          dialogues: from :func:`load_dialogues`.
          tokenizer: any :class:`Tokenizer` (SentencePiece or bytes).
          length: row length L.
          loss_on: ``"all"`` or ``"replies"`` (Person 2 tokens only).
          truncate: ``"turns"`` keeps the newest whole turns of long
            dialogues; ``"drop"`` drops them.
          pack: greedily pack several dialogues per row (best fit, in an
            order shuffled by ``pack_seed``); adds segment_ids/positions.

        Raises:
          ValueError: bad options, or no dialogue fits in ``length``.
        """
        if truncate not in TRUNCATE:
            raise ValueError(f"truncate={truncate!r}; use one of {TRUNCATE}.")
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r}; use one of {LOSS_ON}.")
        if length < 2:
            raise ValueError(f"length={length} is too small.")
        rows: list[tuple[np.ndarray, np.ndarray]] = []
        truncated = dropped = 0
        for dialogue in dialogues:
            fitted = _fit_example(*encode_dialogue(dialogue, tokenizer), length, truncate)
            if fitted is None:
                dropped += 1
                continue
            ids, reply, was_truncated = fitted
            truncated += was_truncated
            rows.append((ids, reply))
        if not rows:
            raise ValueError(
                f"None of the {len(dialogues)} dialogues fits in length={length} tokens "
                f"(truncate={truncate!r}); increase the sequence length."
            )
        stats: dict[str, Any] = {
            "dialogues": len(dialogues),
            "examples": len(rows),
            "truncated": truncated,
            "dropped": dropped,
            "tokens": int(sum(len(r[0]) for r in rows)),
        }
        if dropped or truncated:
            logger.info(
                "length=%d: truncated %d and dropped %d of %d dialogues.", length, truncated, dropped, len(dialogues)
            )
        segment_ids = positions = None
        if pack:
            groups = _pack_best_fit([len(r[0]) for r in rows], length, pack_seed)
            seg_parts, pos_parts, packed = [], [], []
            for group in groups:
                packed.append(
                    (np.concatenate([rows[i][0] for i in group]), np.concatenate([rows[i][1] for i in group]))
                )
                seg_parts.extend(np.full(len(rows[i][0]), k + 1, np.int32) for k, i in enumerate(group))
                pos_parts.extend(np.arange(len(rows[i][0]), dtype=np.int32) for i in group)
            rows = packed
            segment_ids, positions = np.concatenate(seg_parts), np.concatenate(pos_parts)
            stats["packed_rows"] = len(rows)
        stats["rows"] = len(rows)
        stats["fill"] = stats["tokens"] / (len(rows) * length)
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(r[0]) for r in rows], out=offsets[1:])
        return cls(
            tokens=np.concatenate([r[0] for r in rows]).astype(np.int32),
            reply=np.concatenate([r[1] for r in rows]).astype(bool),
            offsets=offsets,
            length=length,
            loss_on=loss_on,
            segment_ids=segment_ids,
            positions=positions,
            stats=stats,
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    def with_loss_on(self, loss_on: str) -> DialogueExamples:
        """Same rows, other weighting (shares the arrays)."""
        return dataclasses.replace(self, loss_on=loss_on)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Padded rows for the given example indices: dict of ``[len(indices), L]``."""
        n, length = len(indices), self.length
        out = {"inputs": np.full((n, length), PAD_ID, np.int32), "weights": np.zeros((n, length), np.float32)}
        if self.packed:
            out["segment_ids"] = np.zeros((n, length), np.int32)
            out["positions"] = np.zeros((n, length), np.int32)
        for j, i in enumerate(indices):
            s, e = self.offsets[i], self.offsets[i + 1]
            out["inputs"][j, : e - s] = self.tokens[s:e]
            out["weights"][j, : e - s] = 1.0 if self.loss_on == "all" else self.reply[s:e]
            if self.packed:
                out["segment_ids"][j, : e - s] = self.segment_ids[s:e]
                out["positions"][j, : e - s] = self.positions[s:e]
        return out


def _pack_best_fit(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Best-fit bin packing of example lengths in a seeded random order."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    groups: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, group id)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            remaining, g = free.pop(k)
        else:
            remaining, g = capacity, len(groups)
            groups.append([])
        groups[g].append(int(i))
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, g))
    return groups


def load_dialogue_examples(
    path: str | os.PathLike[str],
    split: str | None,
    tokenizer: Tokenizer,
    length: int,
    **build_options: Any,
) -> DialogueExamples:
    """``load_dialogues`` + ``DialogueExamples.build`` in one call."""
    return DialogueExamples.build(load_dialogues(path, split), tokenizer, length, **build_options)


# --------------------------------------------------------------------------- batches


def make_batches(
    source: BatchSource,
    *,
    seed: int,
    global_batch_size: int,
    start_step: int = 0,
    num_steps: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``source.batch(step, ...)`` for ``step = start_step, start_step + 1, ...``.

    Args:
      source: :class:`DialogueExamples` or :class:`~reformer_jax.data.text.ByteTextSource`.
      seed: data-order seed.
      global_batch_size: B across all processes (divisible by process_count).
      start_step: first step (resume from a checkpoint's step).
      num_steps: stop after this many batches (None = forever).
      process_index / process_count: this host's slice of the global batch.
      prefetch: if > 0, build batches ahead on 2 background threads with
        ``grain`` (same batches, same order).

    Yields:
      ``{'inputs': int32 [B/P, L], 'weights': float32 [B/P, L]}`` (+
      ``segment_ids``, ``positions`` for packed dialogue sources).
    """
    process_rows(global_batch_size, process_index, process_count)  # validate early
    stop = start_step + num_steps if num_steps is not None else 2**62

    def build(step: int) -> dict[str, np.ndarray]:
        return source.batch(
            int(step), seed=seed, global_batch_size=global_batch_size,
            process_index=process_index, process_count=process_count,
        )

    if prefetch <= 0:
        step = start_step
        while step < stop:
            yield build(step)
            step += 1
        return
    import grain

    dataset = grain.MapDataset.range(start_step, stop).map(build)
    yield from dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))


# --------------------------------------------------------------------------- TFDS (array_record, no TF)

TFDS_NAME = "reformer_dialogues"
_SPEAKER_CODES = {USER: 0, SYSTEM: 1}


@functools.lru_cache(maxsize=1)
def _tfds_builder_class() -> type:
    """Defines the TFDS builder lazily (tensorflow_datasets is optional)."""
    import tensorflow_datasets as tfds

    class ReformerDialogues(tfds.core.GeneratorBasedBuilder):
        """Dialogue corpus read by :func:`load_dialogues`; one config per source corpus."""

        VERSION = tfds.core.Version("1.0.0")
        # No checksum/metadata files next to this module. Also avoids a tfds 4.9 code path
        # that imports the (py<3.9-only) ``importlib_resources`` package.
        code_path = None

        def __init__(self, *, source_dir: str | None = None, splits: Sequence[str] = (), **kwargs: Any):
            self._source_dir = source_dir
            self._splits = tuple(splits)
            super().__init__(**kwargs)

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(
                builder=self,
                description="Dialogues as (speaker code 0=user/1=system, utterance) turns.",
                features=tfds.features.FeaturesDict({
                    "dialogue_id": tfds.features.Text(),
                    "speakers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "utterances": tfds.features.Sequence(tfds.features.Text()),
                }),
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            if self._source_dir is None:
                raise ValueError("Pass source_dir= to prepare the dataset.")
            return {s: self._generate_examples(s) for s in self._splits}

        def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
            for d in load_dialogues(self._source_dir, split):
                yield d.id, {
                    "dialogue_id": d.id,
                    "speakers": np.array([_SPEAKER_CODES[s] for s, _ in d.turns], np.int32),
                    "utterances": [t for _, t in d.turns],
                }

    return ReformerDialogues


def prepare_tfds_dialogues(
    source_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    name: str,
    splits: Sequence[str] = ("train", "validation", "test"),
) -> Path:
    """Writes a dialogue corpus as a TFDS ``array_record`` dataset (no TensorFlow).

    Args:
      source_dir: dataset folder accepted by :func:`load_dialogues` with split=.
      data_dir: TFDS data dir to prepare into.
      name: builder config name, e.g. ``"sgd"`` or ``"multiwoz22"``.
      splits: which splits to write (canonical names are used on disk).

    Returns:
      The dataset version folder ``<data_dir>/reformer_dialogues/<name>/1.0.0``.
      Preparing again is a no-op when it exists.
    """
    import tensorflow_datasets as tfds

    builder = _tfds_builder_class()(
        source_dir=str(source_dir),
        splits=[canonical_split(s) for s in splits],
        config=tfds.core.BuilderConfig(name=name),
        data_dir=str(data_dir),
        file_format="array_record",
    )
    builder.download_and_prepare()
    return Path(builder.data_dir)


def load_tfds_dialogues(
    data_dir: str | os.PathLike[str], *, name: str, split: str
) -> list[Dialogue]:
    """Reads dialogues prepared by :func:`prepare_tfds_dialogues` via ``as_data_source``.

    Works in a fresh process (the builder is restored from the files).
    Order is the TFDS record order (not the source file order).
    """
    import tensorflow_datasets as tfds

    version_dir = Path(data_dir) / TFDS_NAME / name / "1.0.0"
    if not (version_dir / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"No prepared TFDS dataset at {version_dir}; run prepare_tfds_dialogues(source_dir, "
            f"{str(data_dir)!r}, name={name!r}) first."
        )
    source = tfds.builder_from_directory(str(version_dir)).as_data_source(split=canonical_split(split))
    speakers = {code: s for s, code in _SPEAKER_CODES.items()}
    out = []
    for i in range(len(source)):
        record = source[i]
        turns = [(speakers[int(c)], u.decode("utf-8")) for c, u in zip(record["speakers"], record["utterances"])]
        out.append(Dialogue(record["dialogue_id"].decode("utf-8"), turns))
    return out
