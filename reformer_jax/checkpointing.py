"""Checkpoints of the train state with Orbax, resumed automatically from the workdir.

Layout of a workdir:

    <workdir>/config.json                 the run's configuration (written at every start)
    <workdir>/checkpoints/<step>/state    the train state (Orbax, one folder per kept step)
    <workdir>/unreadable_checkpoints/     checkpoints that failed to restore, moved aside
    <workdir>/tokenizer.model             kept there by `reformer_jax.data` (dialogue runs)

The workdir is a local folder or a bucket URL (`gs://bucket/run`): paths are `etils.epath`
paths, and Orbax writes through epath and tensorstore, which handle both (`reformer_jax.storage`).

Nothing about the input pipeline is saved: every batch is a pure function of (seed, step), so
the step inside the state is the whole data position.

Saves are asynchronous: `save` returns once the arrays are copied off the devices, and the
files are written in the background while training continues (the copy happens before the
call returns, so donating the state to the next step is safe). `wait` blocks until everything
is on disk; the trainer calls it at the end and on preemption.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from reformer_jax import storage

CHECKPOINT_DIR = 'checkpoints'
UNREADABLE_DIR = 'unreadable_checkpoints'
CONFIG_FILE = 'config.json'

# What a checkpoint that cannot be read raises from `restore`: tensorstore/OCDBT decoding
# errors (ValueError), missing items or arrays (KeyError, FileNotFoundError), I/O (OSError).
UNREADABLE_ERRORS = (ValueError, KeyError, OSError)


class Checkpointer:
  """An Orbax `CheckpointManager` over `<workdir>/checkpoints` holding one item, `state`."""

  def __init__(self, workdir: str | os.PathLike[str], *, max_to_keep: int | None = 3,
               async_save: bool = True):
    self.workdir = storage.path(workdir)
    self.directory = self.workdir / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    directory = self.directory if storage.is_remote(self.directory) else self.directory.absolute()
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=('state',))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Starts writing `state` as checkpoint `step` (asynchronously); a no-op if it exists."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      force=True)

  def restore_step(self, step: int, abstract_state: Any) -> Any:
    """Restores checkpoint `step` into the structure, shapes and shardings of `abstract_state`."""
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only `state.params` of checkpoint `step`, into `abstract_params` (`jax.ShapeDtypeStruct`s
    with shardings): an Orbax partial restore, so inference never builds nor reads the optimizer
    state."""
    item = {'params': abstract_params}
    args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item))
    return self.manager.restore(step, args=ocp.args.Composite(state=args)).state['params']

  def restore_latest(self, abstract_state: Any) -> Any | None:
    """The newest checkpoint that can be read, or None when there is none at all.

    A checkpoint that fails to restore is reported, moved to `<workdir>/unreadable_checkpoints`
    (so that later saves of that step are possible) and the next newest one is tried. When
    checkpoints exist but none can be read, raises instead of silently starting over.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        return self.restore_step(step, abstract_state)
      except UNREADABLE_ERRORS as e:
        failures.append((step, e))
        logging.error('Checkpoint %s/%d cannot be read (%s: %s); trying an older one.',
                      self.directory, step, type(e).__name__, _first_line(e))
        self._move_aside(step)
    if failures:
      listing = '; '.join(f'step {s}: {type(e).__name__}: {_first_line(e)}' for s, e in failures)
      raise RuntimeError(
          f'No checkpoint in {self.directory} can be restored ({listing}). They were moved to '
          f'{self.workdir / UNREADABLE_DIR}. If the model or optimizer config changed, train in '
          f'a new --workdir; to start this run over, delete {self.directory}.') from failures[-1][1]
    return None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      target = self.workdir / UNREADABLE_DIR / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
      storage.move_tree(self.directory / str(step), target)
      logging.error('Moved unreadable checkpoint %d to %s.', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'move_aside_checkpoint_{step}')
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ''


def save_config(config, workdir: str | os.PathLike[str]) -> epath.Path:
  """Writes `<workdir>/config.json` atomically (process 0) and returns its path."""
  path = storage.path(workdir) / CONFIG_FILE
  if jax.process_index() == 0:
    storage.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True))
  return path


def load_config_dict(workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """The configuration a run in `workdir` last started with, as a dict."""
  return json.loads((storage.path(workdir) / CONFIG_FILE).read_text())
