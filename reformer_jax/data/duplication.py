"""The duplication task of the Reformer paper (section 5): sequences ``0 w 0 w``.

``w`` is a string of ``length / 2 - 1`` symbols drawn uniformly from ``1 .. vocab_size - 1``;
id 0 is the separator. A decoder-only model reads the sequence left to right: the first copy is
unpredictable, the second can be predicted exactly by attending ``length / 2`` positions back.
Loss and accuracy therefore count only the second copy of ``w``: ``weights`` is 1 on positions
``length / 2 + 1 .. length - 1`` and 0 elsewhere, so chance accuracy is ``1 / (vocab_size - 1)``.

Generated, not stored: the rows of training step ``s`` come from
``np.random.default_rng([0, seed, s])`` (a pure function of seed and step, as for every
:func:`~reformer_jax.data.make_batches` source), evaluation example ``i`` from
``np.random.default_rng([1, eval_seed, i])``; the two streams never share a seed sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .text import process_rows

_TRAIN_STREAM, _EVAL_STREAM = 0, 1


class DuplicationSource:
    """Batches of ``0 w 0 w`` sequences: a batch source with ``eval_batches``.

    Attributes:
      vocab_size: ids ``0 .. vocab_size - 1``; 0 is the separator, the rest are symbols.
      length: L, the (even) sequence length; ``|w| = L / 2 - 1``.
      eval_examples: size of the fixed evaluation set.
      eval_seed: seed of the evaluation set.
    """

    def __init__(self, vocab_size: int, length: int, *, eval_examples: int = 256, eval_seed: int = 0):
        if vocab_size < 3:
            raise ValueError(
                f"vocab_size={vocab_size}: the duplication task needs a separator and at least two "
                f"symbols (vocab_size >= 3)."
            )
        if length < 4 or length % 2:
            raise ValueError(f"length={length}: the duplication task needs an even length >= 4 (0 w 0 w).")
        if eval_examples < 1:
            raise ValueError(f"eval_examples={eval_examples} must be >= 1.")
        self.vocab_size = vocab_size
        self.length = length
        self.eval_examples = eval_examples
        self.eval_seed = eval_seed

    def sequences(self, words: np.ndarray) -> dict[str, np.ndarray]:
        """``words`` int ``[B, L/2 - 1]`` -> ``{"inputs": int32 [B, L], "weights": float32 [B, L]}``."""
        half = np.concatenate([np.zeros((len(words), 1), np.int32), words.astype(np.int32)], axis=1)
        inputs = np.concatenate([half, half], axis=1)
        weights = np.zeros(inputs.shape, np.float32)
        weights[:, self.length // 2 + 1 :] = 1.0
        return {"inputs": inputs, "weights": weights}

    def _words(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(1, self.vocab_size, size=(n, self.length // 2 - 1), dtype=np.int32)

    def batch(
        self, step: int, *, seed: int, global_batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """The local rows of the global training batch of ``step``."""
        if step < 0 or seed < 0:
            raise ValueError(f"step and seed must be >= 0 (got {step=}, {seed=}).")
        rows = process_rows(global_batch_size, process_index, process_count)
        words = self._words(np.random.default_rng([_TRAIN_STREAM, seed, step]), global_batch_size)
        return self.sequences(words[rows])

    def eval_batches(
        self, *, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """The evaluation set in order; the last global batch is completed with weight-0 rows."""
        rows = process_rows(batch_size, process_index, process_count)
        for start in range(0, self.eval_examples, batch_size):
            indices = np.arange(start, start + batch_size)[rows]
            words = np.concatenate(
                [self._words(np.random.default_rng([_EVAL_STREAM, self.eval_seed, int(i)]), 1) for i in indices]
            )
            out = self.sequences(words)
            out["weights"][indices >= self.eval_examples] = 0.0
            yield out
