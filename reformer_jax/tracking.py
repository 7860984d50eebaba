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
"""

from __future__ import annotations

import json
import netrc
import os
import pathlib
import uuid
from typing import Any, Mapping, Protocol

import jax
import numpy as np

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
  """Appends `{"step": step, **values}` lines to `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str | os.PathLike[str]):
    self.path = pathlib.Path(workdir) / METRICS_FILE
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, 'a', encoding='utf-8')

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    record = {'step': int(step), **{k: _scalar(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def write_config(self, config: Mapping[str, Any]) -> None:
    del config  # the trainer writes <workdir>/config.json itself

  def close(self) -> None:
    self._file.close()


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

    workdir = pathlib.Path(workdir)
    id_file = workdir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    self._run = wandb.init(project=project, entity=entity or None, mode=mode, tags=list(tags),
                           name=name or workdir.name, id=run_id, resume='allow',
                           dir=str(workdir), config=dict(config or {}))

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    self._run.log({k: _scalar(v) for k, v in values.items()}, step=int(step))

  def write_config(self, config: Mapping[str, Any]) -> None:
    self._run.config.update(dict(config), allow_val_change=True)

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


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl`, in order."""
  path = pathlib.Path(workdir) / METRICS_FILE
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
