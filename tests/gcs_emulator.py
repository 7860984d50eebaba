"""A fake Google Cloud Storage server for the tests: `python tests/gcs_emulator.py PORT BUCKET`.

It is `gcp-storage-emulator` (pure Python, in memory, BUCKET created empty) with what tensorstore's
GCS driver, which writes Orbax's arrays, needs and the emulator lacks:

* object downloads carry `x-goog-generation` / `x-goog-metageneration` headers (tensorstore
  takes an object's generation from them; without them it reads 0 and fails with "Malformed
  StorageGeneration" at the next conditional read);
* the generation preconditions of reads (`ifGenerationMatch` -> 412, `ifGenerationNotMatch`
  -> 304) and of media uploads (`ifGenerationMatch`, 0 meaning "only if absent" -> 412), which
  tensorstore uses for its atomic read-modify-write of OCDBT manifests.
"""

from __future__ import annotations

import logging
import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _current_generation(storage, bucket: str, name: str) -> str | None:
  try:
    return str(storage.get_file_obj(bucket, name)['generation'])
  except NotFound:
    return None


def _precondition_failed(request, generation: str | None) -> HTTPStatus | None:
  """The status that a failed `ifGeneration(Not)Match` query parameter asks for, else None."""
  match = request.query.get('ifGenerationMatch')
  if match and match[0] != (generation or '0'):
    return HTTPStatus.PRECONDITION_FAILED
  not_match = request.query.get('ifGenerationNotMatch')
  if not_match and generation is not None and not_match[0] == generation:
    return HTTPStatus.NOT_MODIFIED
  return None


_download = objects.download
_insert = objects.insert


def download(request, response, storage, *args, **kwargs):
  bucket, name = request.params['bucket_name'], request.params['object_id']
  generation = _current_generation(storage, bucket, name)
  failed = _precondition_failed(request, generation) if generation is not None else None
  if failed is not None:
    response.status = failed
    return
  _download(request, response, storage, *args, **kwargs)
  if generation is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(bucket, name)
    response['x-goog-generation'] = str(obj['generation'])
    response['x-goog-metageneration'] = str(obj['metageneration'])


def insert(request, response, storage, *args, **kwargs):
  name = (request.query.get('name') or [None])[0]
  if name is not None and request.query.get('ifGenerationMatch'):
    generation = _current_generation(storage, request.params['bucket_name'], name)
    if _precondition_failed(request, generation) is not None:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
  return _insert(request, response, storage, *args, **kwargs)


def main(argv: list[str]) -> None:
  port, bucket = int(argv[1]), argv[2]
  objects.download, objects.insert = download, insert
  # Imported after the patch: the server's route table takes the handlers when it is imported.
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.WARNING)
  create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket).run()


if __name__ == '__main__':
  main(sys.argv)
