"""Bucket workdirs (`gs://...`) against a local GCS emulator: the storage helpers, metrics.jsonl,
checkpoints, and training that resumes from a bucket.

Needs `pip install -e '.[test]'` (skipped otherwise). The emulator is `gcp-storage-emulator`
(pure Python) with the generation headers and preconditions tensorstore needs added
(`tests/gcs_emulator.py`), started once for the module in a subprocess. gcsfs (through
`etils.epath`) finds it through `$STORAGE_EMULATOR_HOST`; tensorstore, which writes Orbax's
arrays, through `$TENSORSTORE_GCS_HTTP_URL` (read once per process: set before any gs:// use)
and `$GOOGLE_AUTH_TOKEN_FOR_TESTING` (a fixed bearer token instead of Google credentials).
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (read when gcsfs is imported, at the first gs:// use)
keeps gcsfs from asking Google's control plane for the bucket type at every call, which the
emulator lacks (a warning each time).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

for _module in ('gcsfs', 'gcp_storage_emulator'):  # found, not imported: see `gcs`
  if importlib.util.find_spec(_module) is None:
    pytest.skip(f"{_module} is not installed: pip install -e '.[test]'",
                allow_module_level=True)

from test_train import REPO, compilation_cache, tiny_config  # noqa: E402,F401  (fixture)
from reformer_jax import checkpointing, storage, tracking, train  # noqa: E402

BUCKET = 'test-bucket'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """A GCS emulator holding an empty bucket `test-bucket`; yields a fresh `gs://` folder maker."""
  port = _free_port()
  log = open(tmp_path_factory.mktemp('emulator') / 'emulator.log', 'w')
  proc = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'gcs_emulator.py'), str(port),
                           BUCKET], stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 30
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f'the GCS emulator did not start: see {log.name}')
      time.sleep(0.2)
  url = f'http://127.0.0.1:{port}'
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-token',
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
         storage.CACHE_ENV: str(tmp_path_factory.mktemp('cache'))}
  previous = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  counter = iter(range(10**6))
  try:
    yield lambda name: f'gs://{BUCKET}/{name}-{next(counter)}'
  finally:
    for k, v in previous.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def _objects(url: str) -> list[str]:
  """Every object under `url`, relative to it."""
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, key = fsspec.core.url_to_fs(url)
  fs.invalidate_cache()
  return sorted(f[len(key) + 1:] for f in fs.find(key))


# --------------------------------------------------------------------------- storage helpers


def test_paths_and_local_stand_ins(gcs, tmp_path, monkeypatch):
  assert not storage.is_remote(tmp_path) and storage.is_remote('gs://b/run')
  assert storage.local_dir(tmp_path) == tmp_path  # a local workdir is its own stand-in
  local = storage.local_dir('gs://b/sweep/run')
  assert local == storage.cache_root() / 'gs' / 'b' / 'sweep' / 'run' and local.is_dir()
  storage.check_workdir('gs://b/run')
  monkeypatch.setattr(storage.importlib.util, 'find_spec', lambda name: None)  # no gcsfs
  storage.check_workdir(tmp_path)
  with pytest.raises(ImportError, match=r"--workdir=gs://b/run needs gcsfs.*\.\[gcs\]"):
    storage.check_workdir('gs://b/run')


def test_write_append_download_upload_move(gcs, tmp_path):
  root = storage.path(gcs('helpers'))
  storage.write_text(root / 'config.json', '{"a": 1}')
  assert json.loads((root / 'config.json').read_text()) == {'a': 1}
  for i in range(3):  # create, then two server-side appends (GCS compose)
    storage.append_text(root / 'metrics.jsonl', f'{{"step": {i}}}\n')
  assert (root / 'metrics.jsonl').read_text().splitlines() == [f'{{"step": {i}}}' for i in range(3)]
  assert not [o for o in _objects(str(root)) if '.append-' in o]  # the parts were deleted

  local = tmp_path / 'copy' / 'config.json'
  assert storage.download(root / 'config.json', local) and local.read_text() == '{"a": 1}'
  assert not storage.download(root / 'missing', local.parent / 'missing')
  local.write_text('stale')  # a cached copy of a file the bucket no longer has is removed
  (root / 'config.json').unlink()
  assert not storage.download(root / 'config.json', local) and not local.exists()
  (tmp_path / 'tree' / 'sub').mkdir(parents=True)
  (tmp_path / 'tree' / 'a.txt').write_text('a')
  (tmp_path / 'tree' / 'sub' / 'b.txt').write_text('b')
  assert storage.upload_tree(tmp_path / 'tree', root / 'profile') == 2
  assert _objects(str(root / 'profile')) == ['a.txt', 'sub/b.txt']
  assert storage.local_file(root / 'profile' / 'sub' / 'b.txt').read_text() == 'b'
  with pytest.raises(FileNotFoundError, match='missing'):
    storage.local_file(root / 'missing')

  # Moving checkpoint 2 aside leaves checkpoint 20 alone.
  for step in (2, 20):
    storage.write_text(root / 'checkpoints' / str(step) / 'state' / 'data', str(step))
  storage.move_tree(root / 'checkpoints' / '2', root / 'unreadable' / '2-x')
  assert _objects(str(root / 'checkpoints')) == ['20/state/data']
  assert _objects(str(root / 'unreadable')) == ['2-x/state/data']


def test_jsonl_writer_batches_appends_to_the_bucket(gcs, monkeypatch):
  workdir = gcs('metrics')
  writer = tracking.JsonlWriter(workdir, flush_every_s=3600)
  writer.write(1, {'loss': np.float32(2.0)})
  assert not storage.path(workdir).joinpath(tracking.METRICS_FILE).exists()  # held back
  writer.close()
  writer = tracking.JsonlWriter(workdir, flush_every_s=0)  # a resumed run appends
  writer.write(2, {'loss': jnp.float32(1.5)})
  assert [r['step'] for r in tracking.read_metrics(workdir)] == [1, 2]  # written at once
  # A failed append keeps the lines for the next flush; training is not stopped.
  calls = []
  real_append = storage.append_text

  def flaky(path, text):
    calls.append(text)
    if len(calls) == 1:
      raise OSError('503 Service Unavailable')
    real_append(path, text)

  monkeypatch.setattr(storage, 'append_text', flaky)
  writer.write(3, {'loss': 1.0})
  writer.write(4, {'loss': 0.5})
  writer.close()
  assert [r['step'] for r in tracking.read_metrics(workdir)] == [1, 2, 3, 4]


def test_checkpointer_on_a_bucket_saves_restores_and_moves_unreadable_aside(gcs):
  workdir = gcs('checkpointer')
  state = lambda v: {'w': jnp.full((2, 3), v), 'step': jnp.int32(v)}
  checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=2)
  for step in (1, 2, 3):
    checkpointer.save(step, state(step))
  checkpointer.close()
  assert checkpointing.Checkpointer(workdir).all_steps() == [2, 3]
  # Overwrite checkpoint 3's OCDBT manifest: restore falls back to 2 and moves 3 aside.
  (storage.path(workdir) / 'checkpoints' / '3' / 'state' / 'manifest.ocdbt').write_bytes(b'junk')
  checkpointer = checkpointing.Checkpointer(workdir)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state(0))
  restored = checkpointer.restore_latest(abstract)
  assert int(restored['step']) == 2 and checkpointer.all_steps() == [2]
  checkpointer.close()
  moved = {o.split('/')[0] for o in _objects(f'{workdir}/{checkpointing.UNREADABLE_DIR}')}
  assert [m.split('-')[0] for m in moved] == ['3']


def test_wandb_writer_keeps_its_run_id_on_the_bucket_and_its_files_here(gcs, monkeypatch):
  runs = []

  class FakeRun:
    def finish(self):
      pass

  monkeypatch.setitem(sys.modules, 'wandb',
                      types.SimpleNamespace(init=lambda **kw: runs.append(kw) or FakeRun()))
  workdir = gcs('wandb')
  for _ in range(2):  # the second is a resumed job: same run
    tracking.WandbWriter(workdir, project='p', entity=None, mode='offline').close()
  run_id = (storage.path(workdir) / tracking.RUN_ID_FILE).read_text()
  assert [r['id'] for r in runs] == [run_id, run_id]
  assert runs[0]['dir'] == str(storage.local_dir(workdir)) and not storage.is_remote(runs[0]['dir'])
  assert runs[0]['name'] == workdir.rsplit('/', 1)[-1]


def test_sweep_runner_reads_progress_and_summary_from_a_bucket(gcs, capsys, monkeypatch):
  from launch import sweep as sweep_lib  # pylint: disable=import-outside-toplevel
  workdir = gcs('sweep')
  assert sweep_lib.training_progress(workdir) is None  # not a training run (yet)
  storage.write_text(f'{workdir}/config.json', json.dumps({'num_train_steps': 3}))
  storage.append_text(f'{workdir}/metrics.jsonl', '{"step": 1, "train/loss": 2.0}\n'
                                                 '{"step": 2, "train/loss": 1.0}\n')
  assert sweep_lib.training_progress(workdir) == (2, 3)  # incomplete: stopped at step 2 of 3
  assert sweep_lib.training_summary(sweep_lib.workdir_path(workdir)) == {'step': 2,
                                                                       'train/loss': 1.0}
  # A bucket that cannot be read (credentials, permissions) is reported, not fatal.
  def refused(path):
    raise PermissionError(f'403 Forbidden: {path}')

  monkeypatch.setattr(sweep_lib, '_training_progress', refused)
  assert sweep_lib.training_progress(workdir) is None
  assert f'cannot read {workdir} (PermissionError: 403' in capsys.readouterr().err


# --------------------------------------------------------------------------- training


def test_training_in_a_bucket_resumes_from_its_checkpoint(gcs, caplog):
  workdir = gcs('train')
  config = tiny_config(num_train_steps=4, checkpoint_every_steps=2, log_every_steps=1,
                       profile_steps=1)
  first = train.train_and_evaluate(config, workdir)
  assert first['step'] == 4
  assert any(o.startswith('profile/') for o in _objects(workdir))  # traced here, then uploaded
  config.profile_steps = 0
  assert checkpointing.Checkpointer(workdir).all_steps() == [2, 4]
  config.num_train_steps = 6
  with caplog.at_level('INFO'):
    second = train.train_and_evaluate(config, workdir)
  assert 'Resumed from checkpoint step 4' in caplog.text and second['step'] == 6
  objects = _objects(workdir)
  assert {'config.json', 'metrics.jsonl'} <= set(objects)
  assert checkpointing.load_config_dict(workdir)['num_train_steps'] == 6
  steps = [r['step'] for r in tracking.read_metrics(workdir) if 'train/loss' in r]
  assert steps == [1, 2, 3, 4, 5, 6]  # both runs' lines, appended


@pytest.mark.slow
def test_dialogue_training_in_a_bucket_keeps_its_tokenizer_there(gcs):
  from configs import chatbot  # pylint: disable=import-outside-toplevel
  from reformer_jax import data  # pylint: disable=import-outside-toplevel
  try:
    data.resolve_data_dir()
  except FileNotFoundError as e:
    pytest.skip(f'shared data dir not available: {e}')
  workdir = gcs('chatbot')
  config = chatbot.get_config('tiny')
  config.wandb.mode = 'disabled'
  config.num_train_steps = 2
  config.log_every_steps = 1
  train.train_and_evaluate(config, workdir)
  assert {'tokenizer.model', 'tokenizer.meta.json', 'config.json', 'metrics.jsonl'} <= set(
      _objects(workdir))
  local = storage.local_dir(workdir) / 'tokenizer.model'
  uploaded = storage.path(workdir).joinpath('tokenizer.model').read_bytes()
  assert local.read_bytes() == uploaded
  # A resumed run on another machine (an empty cache) downloads the tokenizer, trains nothing.
  local.unlink()
  config.num_train_steps = 3
  assert train.train_and_evaluate(config, workdir)['step'] == 3
  assert local.read_bytes() == uploaded
  # A vocabulary size that does not fit names the bucket files to delete.
  config.model.vocab_size = 1200
  with pytest.raises(ValueError, match=r'trained for vocab_size=1000.*holds a copy'):
    train.train_and_evaluate(config, workdir)
