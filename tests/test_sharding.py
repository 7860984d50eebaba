"""Mesh and sharding: 8 fake CPU devices and a 2-process `jax.distributed` run on localhost.

The number of CPU devices is fixed when JAX starts, so the multi-device checks run in child
processes of this file (`python tests/test_sharding.py eight_devices ...`) with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` set in their environment.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from test_checkpointing import _abstract_state, _restore
from test_train import REPO, _one_step, compilation_cache, tiny_config  # noqa: F401  (fixture)
from reformer_jax import checkpointing, data, sharding, tracking, train

HERE = os.path.abspath(__file__)


def _child_env(devices: int, cache_dir) -> dict[str, str]:
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
          'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'PYTHONPATH': str(REPO)}


# --------------------------------------------------------------------------- this process


def test_mesh_shardings_and_batch_size_errors():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.size == jax.device_count()
  batch = sharding.global_batch({'inputs': np.arange(8).reshape(4, 2)}, mesh)
  assert batch['inputs'].sharding.spec == PartitionSpec('data')
  assert sharding.replicated(mesh).is_fully_replicated
  with pytest.raises(ValueError, match=r'config\.num_devices=999 but only'):
    sharding.make_mesh(999)

  class EightDevices:
    size = 8
  with pytest.raises(ValueError, match=r'config\.batch_size=12 is not divisible by 8 devices '
                                       r'x grad_accum_steps 2 = 16: use batch_size=16'):
    sharding.check_batch_size('batch_size', 12, EightDevices, multiple=2)


def test_eight_devices(tmp_path, compilation_cache):
  """Sharded step == single-device step; no retracing or recompiling after the first round."""
  proc = subprocess.run([sys.executable, HERE, 'eight_devices', str(tmp_path)],
                        env=_child_env(8, compilation_cache), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-10000:]
  assert 'eight_devices: ok' in proc.stdout


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, compilation_cache):
  """Two `jax.distributed` processes (2 CPU devices each, gloo collectives) train the tiny
  config; their losses and checkpoint match a one-process run within float tolerance."""
  port = _free_port()
  workdir = tmp_path / 'two_processes'
  procs = [subprocess.Popen([sys.executable, HERE, 'distributed', str(i), str(port), str(workdir)],
                            env=_child_env(2, compilation_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=600)[0])
    finally:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-10000:]
  assert all('distributed: ok' in out for out in outputs)

  config = _distributed_config()
  reference = tmp_path / 'one_process'
  train.train_and_evaluate(config, str(reference))
  loss = lambda wd: [r['train/loss'] for r in tracking.read_metrics(wd) if 'train/loss' in r]
  np.testing.assert_allclose(loss(workdir), loss(reference), rtol=1e-5)
  assert checkpointing.Checkpointer(workdir).all_steps() == [2, 4]
  # The checkpoint written by two processes restores in one.
  abstract = _abstract_state(config)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-4),
               _restore(workdir, 4, abstract).params, _restore(reference, 4, abstract).params)


def _distributed_config():
  return tiny_config(num_train_steps=4, checkpoint_every_steps=2, log_every_steps=1)


# --------------------------------------------------------------------------- child processes


def _eight_device_checks(workdir: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  # 1. One step on 8 devices equals the step on 1 device.
  config = tiny_config(batch_size=16)
  batch = data.DuplicationSource(8, 32).batch(0, seed=0, global_batch_size=16)
  config.num_devices = 1
  single, single_metrics = _one_step(config, batch)
  config.num_devices = 8
  sharded, sharded_metrics = _one_step(config, batch)
  mesh = sharding.make_mesh()
  global_batch = sharding.global_batch(batch, mesh)
  assert global_batch['inputs'].sharding.spec == PartitionSpec('data')
  assert [s.data.shape for s in global_batch['inputs'].addressable_shards] == [(2, 32)] * 8
  assert all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8
             for x in jax.tree.leaves(sharded.params))
  for k in ('loss', 'accuracy', 'grad_norm'):
    np.testing.assert_allclose(sharded_metrics[k], single_metrics[k], rtol=1e-5, err_msg=k)
  # Adam's first update is about lr * sign(g): allow 1% of the step size where g is near zero.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=0.01 * config.learning_rate), sharded.params, single.params)

  # 2. A training run traces its step and each evaluation once; after the first evaluation
  # (steps 3-6, two more evaluations, checkpoints) nothing is traced or compiled again.
  train.train_step = chex.assert_max_traces(train.train_step, n=1)
  train.eval_step = chex.assert_max_traces(train.eval_step, n=2)  # 'eval' and 'eval_full'
  late_events = []
  first_eval = train.Evaluator.__call__

  def evaluate_and_start_counting(self, params):
    out = first_eval(self, params)
    if not late_events:
      late_events.append('armed')
      jax.monitoring.register_event_duration_secs_listener(
          lambda name, *_, **__: late_events.append(name) if name in (
              '/jax/core/compile/jaxpr_trace_duration',
              '/jax/core/compile/backend_compile_duration') else None)
    return out

  train.Evaluator.__call__ = evaluate_and_start_counting
  config = tiny_config(batch_size=16, num_train_steps=6, eval_every_steps=2,
                       checkpoint_every_steps=2, eval_n_hashes=(0,), log_every_steps=1)
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 6 and np.isfinite(result['eval_full/loss'])
  assert late_events == ['armed'], late_events
  print('eight_devices: ok')


def _distributed_run(process_id: int, port: int, workdir: str) -> None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                             process_id=process_id, initialization_timeout=120)
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  result = train.train_and_evaluate(_distributed_config(), workdir)
  assert result['step'] == 4
  jax.distributed.shutdown()
  print('distributed: ok')


if __name__ == '__main__':
  if sys.argv[1] == 'eight_devices':
    _eight_device_checks(sys.argv[2])
  elif sys.argv[1] == 'distributed':
    _distributed_run(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  else:
    raise SystemExit(f'unknown check {sys.argv[1]!r}')
