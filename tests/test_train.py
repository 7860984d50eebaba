"""Training on the real code path with shrunk configs: learning, metrics, schedules, accumulation,
the NaN guard, bfloat16, Adafactor, and the dialogue and byte-level text tasks.

Compiling dominates the time of these tests, so they share one persistent compilation cache
(`compilation_cache`, also used by test_checkpointing/test_sharding/test_configs) and mostly
reuse the `configs/default.py:tiny` program.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

from conftest import persistent_compilation_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # configs/ lives beside the package, at the repository root
  sys.path.insert(0, str(REPO))

from configs import default  # noqa: E402
from reformer_jax import checkpointing, data, sharding, tracking, train  # noqa: E402
from reformer_jax.models import ReformerLM  # noqa: E402

# Metric keys every training log line carries.
TRAIN_KEYS = {'train/loss', 'train/accuracy', 'train/perplexity', 'train/learning_rate',
              'train/grad_norm', 'perf/step_time_s', 'perf/tokens_per_s',
              'memory/host_peak_rss_bytes', 'lsh/bucket_balance_layer0'}


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache shared by the training test modules of this session."""
  cache_dir = tmp_path_factory.getbasetemp() / 'jax_compilation_cache'
  with persistent_compilation_cache(cache_dir):
    yield cache_dir


def tiny_config(**overrides):
  """`configs/default.py:tiny` with W&B off and dotted-name overrides (`model__dtype=...`)."""
  config = default.get_config('tiny')
  config.wandb.mode = 'disabled'
  for name, value in overrides.items():
    *parents, leaf = name.split('__')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _tree_equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)),
                                          a, b)))


# --------------------------------------------------------------------------- data and schedules


def test_duplication_batches_are_0w0w_and_a_pure_function_of_step():
  source = data.DuplicationSource(vocab_size=10, length=16, eval_examples=5)
  batch = source.batch(3, seed=7, global_batch_size=4)
  x, w = batch['inputs'], batch['weights']
  assert x.shape == w.shape == (4, 16) and x.dtype == np.int32
  np.testing.assert_array_equal(x[:, :8], x[:, 8:])            # 0 w 0 w
  assert (x[:, 0] == 0).all() and (x[:, 1:8] >= 1).all() and (x[:, 1:8] < 10).all()
  np.testing.assert_array_equal(w[0], [0] * 9 + [1] * 7)       # only the second copy of w
  again = source.batch(3, seed=7, global_batch_size=4)
  np.testing.assert_array_equal(x, again['inputs'])
  assert not np.array_equal(x, source.batch(4, seed=7, global_batch_size=4)['inputs'])
  halves = [source.batch(3, seed=7, global_batch_size=4, process_index=i, process_count=2)
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h['inputs'] for h in halves]), x)
  evals = list(source.eval_batches(batch_size=4))
  assert len(evals) == 2 and evals[1]['weights'][1:].sum() == 0  # 5 examples, 3 padding rows
  np.testing.assert_array_equal(next(source.eval_batches(batch_size=4))['inputs'],
                                evals[0]['inputs'])


def test_schedules_warm_up_then_decay():
  config = tiny_config(learning_rate=1.0, warmup_steps=10, num_train_steps=100)
  rsqrt = train.make_schedule(config)
  np.testing.assert_allclose([rsqrt(0), rsqrt(5), rsqrt(10), rsqrt(40)],
                             [0.0, 0.5, 1.0, math.sqrt(10 / 40)], rtol=1e-6)
  config.schedule = 'cosine'
  config.final_lr_fraction = 0.1
  cosine = train.make_schedule(config)
  np.testing.assert_allclose([cosine(5), cosine(10), cosine(55), cosine(100)],
                             [0.5, 1.0, 0.55, 0.1], rtol=1e-5)
  config.schedule = 'constant'
  np.testing.assert_allclose(train.make_schedule(config)(90), 1.0)


def test_wandb_mode_auto_is_offline_without_an_api_key(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))  # no ~/.netrc
  monkeypatch.delenv('WANDB_API_KEY', raising=False)
  monkeypatch.delenv('WANDB_MODE', raising=False)
  assert tracking.wandb_mode('auto') == 'offline'
  monkeypatch.setenv('WANDB_API_KEY', 'x' * 40)
  assert tracking.wandb_mode('auto') == 'online'
  monkeypatch.setenv('WANDB_MODE', 'disabled')
  assert tracking.wandb_mode('auto') == 'disabled' and tracking.wandb_mode('offline') == 'offline'
  with pytest.raises(ValueError, match=r"config\.wandb\.mode='on': use one of"):
    tracking.wandb_mode('on')


# --------------------------------------------------------------------------- end to end


def test_tiny_duplication_learns_and_logs_everything(tmp_path):
  config = tiny_config(eval_n_hashes=(0, 4), checkpoint_every_steps=100)
  result = train.train_and_evaluate(config, str(tmp_path))
  chance = 1 / (config.model.vocab_size - 1)
  # Learns: chance is 0.14 (loss 1.95); this run reaches about 0.77 (loss 0.72).
  assert result['eval/accuracy'] > 0.5, result
  assert result['eval/loss'] < 0.8 * math.log(config.model.vocab_size - 1)
  assert result['eval_full/accuracy'] > chance and result['eval_lsh4/accuracy'] > chance
  assert result['step'] == 300 and not result['preempted']

  records = tracking.read_metrics(tmp_path)
  assert all('step' in r for r in records)
  train_records = [r for r in records if 'train/loss' in r]
  assert [r['step'] for r in train_records] == [50, 100, 150, 200, 250, 300]
  assert TRAIN_KEYS <= set(train_records[0])
  assert train_records[-1]['train/loss'] < train_records[0]['train/loss']
  assert records[0]['step'] == 0 and records[0]['memory/compiled_temp_bytes'] > 0
  assert records[0]['memory/compiled_alias_bytes'] > 0  # the donated state is reused in place
  assert records[0]['num_params'] > 0
  eval_records = [r for r in records if 'eval/loss' in r]
  assert eval_records[-1]['step'] == 300
  assert {'eval/perplexity', 'eval_full/loss', 'eval_lsh4/accuracy'} <= set(eval_records[-1])
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['d_model'] == 32 and saved['eval_n_hashes'] == [0, 4]
  assert checkpointing.Checkpointer(tmp_path).all_steps() == [100, 200, 300]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """NaN loss weights from step 3 on: the run stops at step 3 and checkpoint 2 stays good."""
  clean = data.DuplicationSource.batch

  def poisoned(self, step, **kwargs):
    batch = clean(self, step, **kwargs)
    if step >= 2:  # the batch of the third update
      batch['weights'] = np.full_like(batch['weights'], np.nan)
    return batch

  monkeypatch.setattr(data.DuplicationSource, 'batch', poisoned)
  config = tiny_config(num_train_steps=10, checkpoint_every_steps=1)
  with pytest.raises(train.NonFiniteError, match=r'non-finite loss.*at step 3.*step 2, is intact'):
    train.train_and_evaluate(config, str(tmp_path))
  checkpointer = checkpointing.Checkpointer(tmp_path)
  assert checkpointer.all_steps() == [1, 2]
  model_cfg = train.validate_config(config)
  tx = train.make_optimizer(config, train.make_schedule(config))
  abstract, _, _ = train.create_train_state(ReformerLM(model_cfg), tx, config,
                                            sharding.make_mesh(), jax.random.PRNGKey(0))
  state = checkpointer.restore_latest(abstract)
  checkpointer.close()
  assert int(state.step) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def _one_step(config, batch, state=None):
  """Compiles the trainer's step for `config` and runs it once from a fresh (or given) state."""
  model_cfg = train.validate_config(config)
  model = ReformerLM(model_cfg)
  schedule = train.make_schedule(config)
  tx = train.make_optimizer(config, schedule)
  mesh = sharding.make_mesh(config.num_devices)
  abstract, shardings, init = train.create_train_state(model, tx, config, mesh,
                                                       jax.random.PRNGKey(0))
  step = train.compile_train_step(model, tx, schedule, config, mesh, abstract, shardings,
                                  use_mask=False)
  key = sharding.replicate(jax.random.PRNGKey(1), mesh)
  state = init() if state is None else state
  return step(state, sharding.global_batch(batch, mesh), key)


def test_gradient_accumulation_matches_one_big_batch():
  # Full attention: LSH would draw different rotations per micro-batch.
  config = tiny_config(model__attention_types=('full',), warmup_steps=0, schedule='constant')
  batch = data.DuplicationSource(8, 32).batch(0, seed=0, global_batch_size=config.batch_size)
  batch['weights'][::3] = 0.0  # uneven token counts per micro-batch
  whole, whole_metrics = _one_step(config, batch)
  config.grad_accum_steps = 4
  accumulated, accumulated_metrics = _one_step(config, batch)
  np.testing.assert_allclose(accumulated_metrics['loss'], whole_metrics['loss'], rtol=1e-6)
  np.testing.assert_allclose(accumulated_metrics['grad_norm'], whole_metrics['grad_norm'],
                             rtol=1e-5)
  # Adam's first update is about lr * sign(g): allow 1% of the step size where g is near zero.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=0.01 * config.learning_rate),
               accumulated.params, whole.params)


def test_bfloat16_compute_keeps_float32_params_and_adafactor_runs():
  config = tiny_config(model__dtype='bfloat16', optimizer='adafactor', schedule='cosine',
                       warmup_steps=1, num_train_steps=4)
  batch = data.DuplicationSource(8, 32).batch(0, seed=0, global_batch_size=config.batch_size)
  state, metrics = _one_step(config, batch)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('float32')}
  assert np.isfinite(metrics['loss']) and 1.0 < metrics['loss'] < 3.0  # ~ln 8 at init
  assert metrics['grad_norm'] > 0 and int(state.step) == 1


def test_config_errors_name_the_field_before_any_work(tmp_path):
  config = tiny_config(batch_size=6)
  with pytest.raises(ValueError, match=r'config\.batch_size=6 is not divisible by .*use'):
    config.grad_accum_steps = 4
    train.train_and_evaluate(config, str(tmp_path / 'a'))
  with pytest.raises(ValueError, match=r'config\.data\.seq_len=36 is not a multiple of '
                                       r'model\.chunk_len=8: use seq_len=40'):
    train.train_and_evaluate(tiny_config(data__seq_len=36, model__max_len=40), str(tmp_path / 'b'))
  assert not (tmp_path / 'b').exists()


# --------------------------------------------------------------------------- other tasks


@pytest.fixture(scope='module')
def data_dir():
  try:
    return data.resolve_data_dir()
  except FileNotFoundError as e:
    pytest.skip(f'shared data dir not available: {e}')


def test_dialogue_task_trains_and_keeps_its_tokenizer(tmp_path, data_dir):
  # CamRest676 trains (small and quick to read); MultiWOZ 2.1 validation evaluates.
  config = tiny_config(
      data__task='dialogue', data__data_dir=str(data_dir), data__train_corpus='camrest676',
      data__max_train_dialogues=100, data__max_eval_dialogues=8, data__seq_len=128,
      data__loss_on='replies', model__vocab_size=512, model__max_len=128, model__chunk_len=32,
      num_train_steps=3, batch_size=8, eval_batch_size=8, log_every_steps=1)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / 'tokenizer.model').is_file()
  assert math.isfinite(result['eval/loss']) and result['eval/perplexity'] > 1
  records = tracking.read_metrics(tmp_path)
  assert records[0]['data/train_examples'] == 100 and records[0]['data/eval_examples'] == 8
  # A resumed run reuses the tokenizer; a different vocabulary size is refused with the fix.
  config.model.vocab_size = 600
  with pytest.raises(ValueError, match='trained for vocab_size=512'):
    train.train_and_evaluate(config, str(tmp_path))


def test_text_task_reports_bits_per_character(tmp_path, data_dir):
  config = tiny_config(
      data__task='text', data__data_dir=str(data_dir), data__text_file='tinyshakespeare/' +
      next(p.name for p in (data_dir / 'tinyshakespeare').iterdir() if p.name.startswith('input')),
      data__validation_fraction=0.001, model__vocab_size=256, num_train_steps=3,
      max_eval_batches=2, log_every_steps=1)
  result = train.train_and_evaluate(config, str(tmp_path))
  np.testing.assert_allclose(result['eval/bits_per_char'], result['eval/loss'] / math.log(2))
  assert 'eval/perplexity' not in result and 4 < result['eval/bits_per_char'] < 9


def test_backend_options_on_cpu(monkeypatch):
  """On CPU the steps compile without YNNPACK fusions unless XLA_FLAGS already sets the flag;
  the options compile, and they reach the config's compiler options."""
  train.backend_options.cache_clear()
  try:
    monkeypatch.setenv('XLA_FLAGS', '')
    assert train.backend_options() == train.CPU_OPTIONS
    config = ml_collections.ConfigDict({'fast_compile': True})
    assert train.compiler_options(config) == {**train.CPU_OPTIONS,
                                              'xla_backend_optimization_level': 0}
    train.backend_options.cache_clear()
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot')
    assert train.backend_options() == {}
    assert train.compiler_options(ml_collections.ConfigDict({'fast_compile': False})) is None
  finally:
    train.backend_options.cache_clear()
