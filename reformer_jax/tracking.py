"""Metric writers: `metrics.jsonl` in the workdir, and Weights & Biases.

Training talks to one small interface, `MetricWriter` (`write(step, values)`,
`write_config(config)`, `close()`). `create_writer` builds it:

* process 0 always writes `<workdir>/metrics.jsonl`, one JSON object per logged step, e.g.
  `{"step": 100, "train/loss": 2.31, "train/accuracy": 0.41, ...}`; a resumed run appends, so a
  step can appear twice (the steps after the last checkpoint were run twice).
* process 0 also logs to W&B unless `config.wandb.mode == 'disabled'`. `wandb` is imported only
  then. Mode `'auto'` follows `$WANDB_MODE` when set, else runs online when an API key is
  configured (`$WANDB_API_KEY` or a `~/.netrc` entry for api.wandb.ai) and offline otherwise;
  an offline run is uploaded later with `wandb sync <workdir>/wandb/offline-run-*`. The run id
  is kept in `<workdir>/wandb_run_id`, so a resumed job continues the same W&B run.
* other processes get a writer that drops everything.

A bucket workdir (`gs://bucket/run`, see `reformer_jax.storage`): metrics.jsonl and wandb_run_id
are kept on the bucket; `JsonlWriter` holds its lines and appends them to the object at most
every `flush_every_s` (30 s) and at `close()`, so a killed run loses at most that much of its log
(the steps after the last checkpoint are rerun and logged again anyway). W&B's own folder must be
local: it is `storage.local_dir(workdir)/wandb` (under `~/.cache/reformer_jax/gs/...`).
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
import uuid
from typing import Any, Mapping, Protocol

import jax
import numpy as np

from reformer_jax import storage

METRICS_FILE = 'metrics.jsonl'
RUN_ID_FILE = 'wandb_run_id'
WANDB_MODES = ('auto', 'online', 'offline', 'disabled')


class MetricWriter(Protocol):
  def write(self, step: int, values: Mapping[str, Any]) -> None:
    """Logs scalar values (numbers or 0-d arrays) at `step`."""

  def write_config(self, config: Mapping[str, Any]) -> None:
    """Records the full run configuration (a nested dict)."""

  def close(self) -> None:
    """Flushes and releases resources."""


def _scalar(value: Any) -> float | int:
  """A Python number from a number or 0-d array (NaN/Inf stay: json writes NaN/Infinity)."""
  return np.asarray(value).item()


class JsonlWriter:
  """Appends `{"step": step, **values}` lines to `<workdir>/metrics.jsonl`: a local file at
  every write, a bucket object at most every `flush_every_s` (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike[str], *, flush_every_s: float = 30.0):
    self.path = storage.path(workdir) / METRICS_FILE
    self.remote = storage.is_remote(self.path)
    self.flush_every_s = flush_every_s
    self._pending: list[str] = []
    self._flushed_at = time.monotonic()
    self._file = None
    if not self.remote:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, 'a', encoding='utf-8')

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    record = {'step': int(step), **{k: _scalar(v) for k, v in values.items()}}
    if self._file is not None:
      self._file.write(json.dumps(record) + '\n')
      self._file.flush()
      return
    self._pending.append(json.dumps(record) + '\n')
    if time.monotonic() - self._flushed_at >= self.flush_every_s:
      self.flush()

  def flush(self) -> None:
    """Appends the held lines to the bucket object now; on an error keeps them for the next try
    (training goes on) and logs it."""
    if self._file is not None:
      self._file.flush()
      return
    self._flushed_at = time.monotonic()
    if not self._pending:
      return
    try:
      storage.append_text(self.path, ''.join(self._pending))
    except Exception as e:  # pylint: disable=broad-except  # any storage error: retry later
      logging.error('Could not append %d lines to %s (%s: %s); retrying at the next flush.',
                    len(self._pending), self.path, type(e).__name__, e)
      return
    self._pending = []

  def write_config(self, config: Mapping[str, Any]) -> None:
    del config  # the trainer writes <workdir>/config.json itself

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      return
    self.flush()
    if self._pending:
      logging.error('%d metric lines were not written to %s.', len(self._pending), self.path)


def wandb_mode(requested: str) -> str:
  """Resolves `'auto'` to `'online'` or `'offline'`; other modes pass through."""
  if requested not in WANDB_MODES:
    raise ValueError(f'config.wandb.mode={requested!r}: use one of {WANDB_MODES}')
  if requested != 'auto':
    return requested
  if os.environ.get('WANDB_MODE'):
    return os.environ['WANDB_MODE']
  return 'online' if _has_api_key() else 'offline'


def _has_api_key() -> bool:
  if os.environ.get('WANDB_API_KEY'):
    return True
  try:
    return netrc.netrc().authenticators('api.wandb.ai') is not None
  except (FileNotFoundError, netrc.NetrcParseError):
    return False


class WandbWriter:
  """Logs to a W&B run (imported lazily); offline runs write under `<workdir>/wandb`."""

  def __init__(self, workdir: str | os.PathLike[str], *, project: str, entity: str | None,
               mode: str, tags: tuple[str, ...] = (), name: str | None = None,
               config: Mapping[str, Any] | None = None):
    import wandb  # pylint: disable=import-outside-toplevel

    workdir = storage.path(workdir)
    id_file = workdir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    storage.write_text(id_file, run_id)
    self._run = wandb.init(project=project, entity=entity or None, mode=mode, tags=list(tags),
                           name=name or workdir.name, id=run_id, resume='allow',
                           dir=str(storage.local_dir(workdir)), config=dict(config or {}))
    if storage.is_remote(workdir) and mode == 'offline':
      logging.info('W&B offline files of %s are in %s/wandb (upload: wandb sync).', workdir,
                   storage.local_dir(workdir))

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    self._run.log({k: _scalar(v) for k, v in values.items()}, step=int(step))

  def write_config(self, config: Mapping[str, Any]) -> None:
    self._run.config.update(dict(config), allow_val_change=True)

  def write_summary(self, values: Mapping[str, Any]) -> None:
    """Sets run summary fields (what the W&B runs table shows and compares)."""
    self._run.summary.update(dict(values))

  def close(self) -> None:
    self._run.finish()


class MultiWriter:
  """Sends everything to several writers."""

  def __init__(self, writers: list[MetricWriter]):
    self.writers = writers

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write(step, values)

  def write_config(self, config: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_config(config)

  def close(self) -> None:
    for w in self.writers:
      w.close()


def create_writer(config, workdir: str | os.PathLike[str]) -> MetricWriter:
  """The writer for this process (see the module docstring)."""
  if jax.process_index() != 0:
    return MultiWriter([])
  writers: list[MetricWriter] = [JsonlWriter(workdir)]
  mode = wandb_mode(config.wandb.mode)
  if mode != 'disabled':
    writers.append(WandbWriter(workdir, project=config.wandb.project, entity=config.wandb.entity,
                               mode=mode, tags=tuple(config.wandb.tags), name=config.wandb.name,
                               config=config.to_dict()))
  return MultiWriter(writers)


def log_evaluation(workdir: str | os.PathLike[str], wandb_config: Mapping[str, Any],
                   values: Mapping[str, Any], *, mode: str) -> str:
  """Adds an evaluation's scores to the summary of the training run's W&B run (the workdir's
  `wandb_run_id`, resumed; a new run when the workdir has none), so runs compare by their test
  scores in the W&B runs table. Summary fields, not history: the checkpoint's step may lie
  before the run's last logged step, where W&B drops logged values. `wandb_config`: the run's
  `config.wandb` (project, entity, tags, name). Returns the resolved mode."""
  mode = wandb_mode(mode)
  if mode == 'disabled':
    return mode
  writer = WandbWriter(workdir, project=wandb_config.get('project') or 'reformer-jax',
                       entity=wandb_config.get('entity'), mode=mode,
                       tags=tuple(wandb_config.get('tags') or ()), name=wandb_config.get('name'))
  try:
    writer.write_summary(values)
  finally:
    writer.close()
  return mode


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl`, in order."""
  text = (storage.path(workdir) / METRICS_FILE).read_text(encoding='utf-8')
  return [json.loads(line) for line in text.splitlines() if line.strip()]
