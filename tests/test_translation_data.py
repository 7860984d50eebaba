"""Tests for parallel text (Multi30k): reading, line alignment, encoding and batches."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from reformer_jax import data
from reformer_jax.data.dialogues import resolve_data_dir
from reformer_jax.data.tokenizer import EOS_ID, PAD_ID, ByteTokenizer
from reformer_jax.data.translation import TranslationExamples, load_parallel, split_stem


def _write(directory: Path, name: str, lines: list[str]) -> None:
  with gzip.open(directory / name, 'wt', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


def test_load_parallel_pairs_lines_and_aliases(tmp_path):
  _write(tmp_path, 'val.de.gz', ['Ein Hund.', '', 'Zwei Katzen.'])
  _write(tmp_path, 'val.en.gz', ['A dog.', 'empty source', 'Two cats.'])
  assert split_stem('validation') == 'val' and split_stem('test') == 'test_2016_flickr'
  pairs = load_parallel(tmp_path, 'validation', 'de', 'en')
  assert pairs == [('Ein Hund.', 'A dog.'), ('Zwei Katzen.', 'Two cats.')]  # empty side dropped


def test_load_parallel_errors_name_the_fix(tmp_path):
  _write(tmp_path, 'train.de.gz', ['a', 'b'])
  _write(tmp_path, 'train.en.gz', ['a'])
  with pytest.raises(ValueError, match='line-aligned'):
    load_parallel(tmp_path, 'train', 'de', 'en')
  with pytest.raises(FileNotFoundError, match='src_lang/tgt_lang'):
    load_parallel(tmp_path, 'train', 'de', 'fr')


def test_examples_rows_and_batches():
  pairs = [('abc', 'xy'), ('a' * 20, 'b' * 20), ('q', 'r')]
  ex = TranslationExamples.build(pairs, ByteTokenizer(), src_len=8, tgt_len=6)
  assert ex.stats['pairs'] == 3 and ex.stats['truncated_sources'] == 1
  assert ex.stats['truncated_targets'] == 1
  rows = ex.rows(np.array([0, 1]))
  # 'xy' + EOS then padding; weights cover the EOS, not the padding.
  assert rows['inputs'][0, 2] == EOS_ID and (rows['inputs'][0, 3:] == PAD_ID).all()
  np.testing.assert_array_equal(rows['weights'][0], [1, 1, 1, 0, 0, 0])
  assert rows['src'][1, -1] == EOS_ID and rows['inputs'][1, -1] == EOS_ID  # cut, still ends
  batch = ex.batch(0, seed=0, global_batch_size=2)
  assert batch['src'].shape == (2, 8) and batch['inputs'].shape == (2, 6)
  evals = list(ex.eval_batches(batch_size=2))
  assert len(evals) == 2 and evals[1]['weights'][1].sum() == 0  # padded last batch
  assert ex.references == ['xy', 'b' * 20, 'r']


def test_length_grouped_batches_cover_each_pair_once_and_cut_padding():
  rng = np.random.default_rng(0)
  pairs = [('s' * int(n), 't' * int(m)) for n, m in rng.integers(1, 30, size=(64, 2))]
  ex = TranslationExamples.build(pairs, ByteTokenizer(), src_len=32, tgt_len=32)
  with pytest.raises(ValueError, match='largest'):
    ex.with_widths((8, 16))
  grouped = ex.with_widths((8, 16, 24, 32))
  seen, widths = [], set()
  for group in range(2):  # one epoch: 8 batches of 8 = 2 groups of 4 batches (group_batches=4)
    batches = [data.length_grouped_indices(3, step, 8, grouped.lengths, group_batches=4)
               for step in range(4 * group, 4 * group + 4)]
    seen += [i for b in batches for i in b.tolist()]
    # The group's 32 pairs are the stream's, sorted by length and cut into 4 batches: the
    # batches' length ranges do not overlap (random batches would each span most of it).
    members = data.batch_indices(3, group, 32, 64)
    assert sorted(i for b in batches for i in b.tolist()) == sorted(members.tolist())
    spans = sorted((grouped.lengths[b].min(), grouped.lengths[b].max()) for b in batches)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
  assert sorted(seen) == list(range(64))
  for step in range(8):
    batch = grouped.batch(step, seed=3, global_batch_size=8)
    width = batch['inputs'].shape[1]
    widths.add(width)
    assert batch['src'].shape == (8, width) and width in (8, 16, 24, 32)
    # Nothing real is cut: every row's EOS is inside the width, and the next width down
    # would not have held the longest row.
    assert (batch['inputs'] == EOS_ID).sum() == 8 and (batch['src'] == EOS_ID).sum() == 8
    assert width == 8 or (batch['weights'].sum(1).max() > width - 8
                          or ((batch['src'] != PAD_ID).sum(1)).max() > width - 8)
  assert len(widths) > 1
  # The same step gives the same batch (resume), and without widths nothing changes.
  np.testing.assert_array_equal(grouped.batch(5, seed=3, global_batch_size=8)['src'],
                                grouped.batch(5, seed=3, global_batch_size=8)['src'])
  assert ex.batch(5, seed=3, global_batch_size=8)['src'].shape == (8, 32)


def test_multi30k_splits():
  try:
    root = resolve_data_dir() / 'multi30k'
  except FileNotFoundError as e:
    pytest.skip(f'shared data dir not available: {e}')
  assert len(load_parallel(root, 'train', 'de', 'en')) == 29000
  test = load_parallel(root, 'test', 'de', 'en')
  assert len(test) == 1000 and test[0][1].startswith('A man in an orange hat')
