"""Command line: `python -m reformer_jax.main --config=configs/<name>.py[:arg] --workdir=DIR`.

Any config field can be overridden, e.g. `--config.num_train_steps=100 --config.model.n_layers=4`.
Rerunning the same command resumes from the newest checkpoint in `--workdir`. Multi-process
runs add `--distributed` (and, off TPU VMs/SLURM/Open MPI, `--coordinator_address=host:port
--num_processes=N --process_id=i`); every process runs the same command with the same workdir.
"""

from __future__ import annotations

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from reformer_jax import host_memory, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the '
                               'tokenizer, local or on a bucket (gs://bucket/run, needs '
                               "pip install -e '.[gcs]'); a rerun resumes from it.")
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() '
                                 'before training (multi-process runs).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'With --distributed: host:port '
                                   'of process 0; unset on TPU VMs, SLURM and Open MPI, where '
                                   'JAX finds it.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --distributed: how many.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --distributed: this one, 0-based.')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
  """Drops Orbax's per-save INFO lines (dozens per checkpoint); its warnings still show."""
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  host_memory.keep_freed_memory()  # before the first computation
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info('JAX %s, process %d of %d, %d local devices', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.NonFiniteError as e:
    raise SystemExit(f'Training diverged: {e}') from e


if __name__ == '__main__':
  app.run(main)
