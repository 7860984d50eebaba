"""Checkpoints: bitwise resume, unreadable-checkpoint fallback, max_to_keep, SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train import REPO, compilation_cache, tiny_config  # noqa: F401  (fixture)
from reformer_jax import checkpointing, sharding, tracking, train
from reformer_jax.models import ReformerLM

N = 4  # steps before the interruption


def _abstract_state(config):
  model_cfg = train.validate_config(config)
  tx = train.make_optimizer(config, train.make_schedule(config))
  abstract, _, _ = train.create_train_state(ReformerLM(model_cfg), tx, config,
                                            sharding.make_mesh(), jax.random.PRNGKey(0))
  return abstract


def _restore(workdir, step, abstract):
  checkpointer = checkpointing.Checkpointer(workdir)
  try:
    return jax.device_get(checkpointer.restore_step(step, abstract))
  finally:
    checkpointer.close()


def _assert_bitwise_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    assert x.dtype == y.dtype and np.array_equal(x, y), 'checkpoints differ'


def _corrupt(workdir, step):
  """Overwrites the OCDBT manifest of checkpoint `step`: Orbax can no longer read its arrays."""
  (workdir / 'checkpoints' / str(step) / 'state' / 'manifest.ocdbt').write_bytes(b'garbage')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """2N steps in one go, checkpoints at N and 2N (data prefetched on background threads)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  config = tiny_config(num_train_steps=2 * N, checkpoint_every_steps=N, log_every_steps=1,
                       max_checkpoints_to_keep=0, data__prefetch=2)
  train.train_and_evaluate(config, str(workdir))
  return workdir, config


def test_stop_and_resume_equals_uninterrupted_training_bitwise(uninterrupted, tmp_path):
  reference, config = uninterrupted
  config = config.copy_and_resolve_references()
  config.data.prefetch = 0
  config.num_train_steps = N
  train.train_and_evaluate(config, str(tmp_path))           # stops after N steps
  config.num_train_steps = 2 * N
  result = train.train_and_evaluate(config, str(tmp_path))  # resumes for N more
  assert result['step'] == 2 * N
  abstract = _abstract_state(config)
  # Checkpoint N of the uninterrupted run was written asynchronously while training went on
  # with the donated state; it must equal the interrupted run's final state.
  _assert_bitwise_equal(_restore(reference, N, abstract), _restore(tmp_path, N, abstract))
  _assert_bitwise_equal(_restore(reference, 2 * N, abstract), _restore(tmp_path, 2 * N, abstract))
  losses = lambda wd: [r['train/loss'] for r in tracking.read_metrics(wd) if 'train/loss' in r]
  assert losses(tmp_path) == losses(reference)


# Orbax leaves tensorstore callbacks behind when a read fails; they hit a closed event loop.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_unreadable_checkpoint_falls_back_to_an_older_one(uninterrupted, tmp_path, caplog):
  reference, config = uninterrupted
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  _corrupt(workdir, 2 * N)
  with caplog.at_level('ERROR'):
    result = train.train_and_evaluate(config, str(workdir))  # resumes from N, retrains N steps
  assert f'checkpoints/{2 * N} cannot be read' in caplog.text
  assert result['step'] == 2 * N
  moved = [p.name.split('-')[0] for p in (workdir / 'unreadable_checkpoints').iterdir()]
  assert moved == [str(2 * N)]
  abstract = _abstract_state(config)
  _assert_bitwise_equal(_restore(reference, 2 * N, abstract), _restore(workdir, 2 * N, abstract))


def _small_state(value: float):
  return {'w': jnp.full((2, 3), value), 'step': jnp.int32(value)}


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_all_unreadable_raises_instead_of_starting_over(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path)
  for step in (1, 2):
    checkpointer.save(step, _small_state(step))
  checkpointer.close()
  for step in (1, 2):
    _corrupt(tmp_path, step)
  checkpointer = checkpointing.Checkpointer(tmp_path)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          _small_state(0))
  with pytest.raises(RuntimeError, match=r'No checkpoint in .* can be restored .*step 2: '
                                         r'ValueError.*new --workdir'):
    checkpointer.restore_latest(abstract)
  checkpointer.close()


def test_max_to_keep_and_saving_an_existing_step_is_a_no_op(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path, max_to_keep=2)
  for step in (1, 2, 3, 4):
    checkpointer.save(step, _small_state(step))
  checkpointer.save(4, _small_state(99))
  checkpointer.wait()
  assert checkpointer.all_steps() == [3, 4]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          _small_state(0))
  assert float(checkpointer.restore_latest(abstract)['w'][0, 0]) == 4.0
  checkpointer.close()


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, compilation_cache):
  """The command line run of the README, stopped by SIGTERM as a preempted job would be."""
  workdir = tmp_path / 'run'
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(compilation_cache),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(
      [sys.executable, '-m', 'reformer_jax.main', '--config=configs/default.py:tiny',
       f'--workdir={workdir}', '--config.num_train_steps=100000', '--config.log_every_steps=5',
       '--config.wandb.mode=disabled'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 240
    while not _logged_training(workdir):
      assert proc.poll() is None, proc.communicate()[0]
      assert time.monotonic() < deadline, 'training did not start'
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, output
  assert 'Preempted: saved checkpoint' in output
  steps = checkpointing.Checkpointer(workdir).all_steps()
  assert len(steps) == 1 and 5 <= steps[0] < 100000
  assert checkpointing.load_config_dict(workdir)['num_train_steps'] == 100000  # the override


def _logged_training(workdir) -> bool:
  path = workdir / tracking.METRICS_FILE
  return path.is_file() and 'train/loss' in path.read_text()
