"""Workdirs on a local disk or in a bucket (`--workdir=gs://bucket/run`), through `etils.epath`.

`path(workdir)` is an `epath.Path`: local paths go to `os`, bucket URLs (`gs://`, also `s3://`)
to fsspec (`gcsfs` for `gs://`, which finds Google's application-default credentials: on a TPU or
GCE VM its service account, elsewhere `gcloud auth application-default login` or
`$GOOGLE_APPLICATION_CREDENTIALS`). Orbax writes checkpoints through epath and tensorstore, which
both take `gs://` as they take a folder. What follows covers the rest of a workdir.

Object stores have no appends, no folder renames and no local files, so for a remote workdir:

* small files (config.json, wandb_run_id) are written whole (`write_text`: one object write,
  atomic, as `os.replace` is for a local file);
* `append_text` appends with GCS's compose: the new lines go up as a temporary object, which is
  concatenated onto the file server-side and deleted, so each append moves only its own bytes
  (other schemes rewrite the file: O(size) per append). `tracking.JsonlWriter` batches its
  lines and appends at most every 30 s, which also keeps to GCS's one-write-a-second-per-object
  limit;
* what needs a real file (sentencepiece's `tokenizer.model`, the profiler's trace, W&B's run
  folder) lives in `local_dir(workdir)`, a local stand-in under `$REFORMER_JAX_CACHE`
  (default `~/.cache/reformer_jax`), `<cache>/gs/<bucket>/<path>`, and is copied to or from the
  bucket with `download`, `upload` and `upload_tree`.

For a local workdir every function here does what the plain file operation does (`local_dir`
is the workdir itself, `download`/`upload` of a file onto itself do nothing).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import shutil
import uuid

from etils import epath

PathLike = str | os.PathLike[str]
CACHE_ENV = 'REFORMER_JAX_CACHE'


def path(p: PathLike) -> epath.Path:
  """`p` as an `epath.Path` (a local path, or a bucket URL such as `gs://bucket/run`)."""
  return epath.Path(p)


def is_remote(p: PathLike) -> bool:
  """Whether `p` is a URL (`gs://...`, `s3://...`) rather than a local path."""
  return '://' in os.fspath(p)


def check_workdir(workdir: PathLike) -> None:
  """Raises ImportError naming the fix when a `gs://` workdir is given without gcsfs installed
  (otherwise the first write, after the model is built, fails)."""
  if os.fspath(workdir).startswith('gs://') and importlib.util.find_spec('gcsfs') is None:
    raise ImportError(f"--workdir={os.fspath(workdir)} needs gcsfs, which epath uses for gs:// "
                      f"paths: pip install -e '.[gcs]' (or pip install gcsfs)")


def cache_root() -> pathlib.Path:
  """Where remote workdirs get their local stand-ins: `$REFORMER_JAX_CACHE` or
  `~/.cache/reformer_jax`."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / '.cache' / 'reformer_jax')


def local_dir(workdir: PathLike) -> pathlib.Path:
  """A local folder for what must be a real file: `workdir` itself when it is local, else
  `<cache_root()>/<scheme>/<bucket>/<path>` (created)."""
  text = os.fspath(workdir)
  if not is_remote(text):
    return pathlib.Path(text)
  scheme, _, rest = text.partition('://')
  parts = [p for p in rest.split('/') if p not in ('', '.', '..')]
  local = cache_root().joinpath(scheme, *parts)
  local.mkdir(parents=True, exist_ok=True)
  return local


def write_text(p: PathLike, text: str) -> None:
  """Writes `p` whole, atomically: a local file through a temporary file and `os.replace`, an
  object in one write (readers see the old or the new content, never a part)."""
  p = path(p)
  if is_remote(p):
    p.write_text(text)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(p.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, p)


def append_text(p: PathLike, text: str) -> None:
  """Appends `text` to `p` (created if missing); see the module docstring for buckets."""
  if not is_remote(p):
    with open(p, 'a', encoding='utf-8') as f:
      f.write(text)
    return
  fs, key = _filesystem(p)
  data = text.encode('utf-8')
  if not fs.exists(key):
    fs.pipe_file(key, data)
  elif 'gs' in _protocols(fs) and hasattr(fs, 'merge'):
    part = f'{key}.append-{uuid.uuid4().hex[:12]}'
    fs.pipe_file(part, data)
    try:
      fs.merge(key, [key, part])  # GCS compose: server-side, the file's bytes are not moved
    finally:
      fs.rm(part)
  else:
    fs.pipe_file(key, fs.cat_file(key) + data)


def _filesystem(p: PathLike):
  """(the fsspec filesystem that epath uses for the URL `p`, `p` without its scheme). The same
  instance as epath's, so that the listings it caches (Orbax lists checkpoints through epath)
  see what is changed here."""
  from etils.epath import backend  # pylint: disable=import-outside-toplevel

  fs = backend.fsspec_backend.fs(os.fspath(p))
  return fs, fs._strip_protocol(os.fspath(p))  # pylint: disable=protected-access


def _protocols(fs) -> tuple[str, ...]:
  protocol = fs.protocol
  return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def download(remote: PathLike, local: PathLike) -> bool:
  """Copies file `remote` to `local` when it exists and returns True; otherwise deletes a stale
  `local` and returns False. With a local `remote`, says whether it exists and copies nothing
  when the two are the same file."""
  remote, local = path(remote), pathlib.Path(local)
  if not remote.is_file():
    if is_remote(remote) and local.exists():
      local.unlink()
    return False
  if os.fspath(remote) != os.fspath(local):
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + f'.tmp{os.getpid()}')
    tmp.write_bytes(remote.read_bytes())
    os.replace(tmp, local)
  return True


def local_file(p: PathLike) -> pathlib.Path:
  """A local path to read the file `p` from: `p` itself when local, else a fresh copy in its
  workdir's `local_dir` (for readers that need a real file, e.g. a sentencepiece model).

  Raises:
    FileNotFoundError: `p` does not exist.
  """
  p = path(p)
  local = local_dir(p.parent) / p.name
  if not download(p, local):
    raise FileNotFoundError(f'{p} does not exist')
  return local


def upload(local: PathLike, remote: PathLike) -> None:
  """Copies the local file `local` to `remote` (nothing when they are the same file)."""
  if os.fspath(local) != os.fspath(remote):
    path(remote).write_bytes(pathlib.Path(local).read_bytes())


def upload_tree(local: PathLike, remote: PathLike) -> int:
  """Copies every file under the local folder `local` to the same place under `remote`;
  returns how many (0 when they are the same folder)."""
  local = pathlib.Path(local)
  if os.fspath(local) == os.fspath(remote):
    return 0
  count = 0
  for file in sorted(f for f in local.rglob('*') if f.is_file()):
    upload(file, path(remote).joinpath(*file.relative_to(local).parts))
    count += 1
  return count


def move_tree(src: PathLike, dst: PathLike) -> None:
  """Moves the folder `src` to `dst` (whose parent is created): `shutil.move` locally; on a
  bucket a server-side copy of every object, then their deletion."""
  if not is_remote(src):
    pathlib.Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(os.fspath(src), os.fspath(dst))
    return
  fs, src_key = _filesystem(src)
  _, dst_key = _filesystem(dst)
  files = fs.find(src_key)
  for file in files:
    fs.copy(file, dst_key + file[len(src_key.rstrip('/')):])
  fs.rm(files)
  logging.info('Moved %d objects from %s to %s.', len(files), src, dst)
