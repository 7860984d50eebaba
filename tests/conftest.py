"""Session fixtures shared by test_inference, test_chat and test_evaluate: the shared data folder,
the tiny chatbot trained once per session, and the environment of command-line subprocesses.

The chatbot is `configs/chatbot.py:tiny` cut to `CHAT_STEPS` steps of 8 rows (under a minute on a
busy 2-core CPU): it talks nonsense, but through the real training, checkpoint and tokenizer code.
Command-line subprocesses share a persistent compilation cache (`compile_cache_dir`), which a test
module can also turn on in-process (`persistent_compilation_cache`) so that a command-line run
finds the programs its in-process tests compiled.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from collections.abc import Iterator

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # configs/ lives beside the package, at the repository root
  sys.path.insert(0, str(REPO))

from configs import chatbot  # noqa: E402
from reformer_jax import data, train  # noqa: E402

CHAT_STEPS = 16
# What the chatbot reads under the shared data folder (configs/chatbot.py:tiny).
CHAT_TRAIN_FILE = 'sgd/train/dialogues_001.json.xz'
MULTIWOZ_VALIDATION = 'multiwoz/val.json.xz'


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """The shared data folder (`$REFORMER_DATA_DIR` or ../shared/data); skips when absent."""
  try:
    return data.resolve_data_dir()
  except FileNotFoundError as e:
    pytest.skip(f'shared data dir not available: {e}')


@contextlib.contextmanager
def persistent_compilation_cache(cache_dir: pathlib.Path) -> Iterator[None]:
  """Inside, every compiled program is written to (and looked up in) `cache_dir`."""
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  jax_cache.set_cache_dir(str(cache_dir))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax_cache.reset_cache()
  try:
    yield
  finally:
    jax_cache.set_cache_dir(previous[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', previous[1])
    jax_cache.reset_cache()


@pytest.fixture(scope='session')
def compile_cache_dir(tmp_path_factory) -> pathlib.Path:
  """The persistent compilation cache of the command-line subprocesses (`cli_env`)."""
  return tmp_path_factory.mktemp('jax_cache_cli')


@pytest.fixture(scope='session')
def chat_workdir(tmp_path_factory, shared_data) -> pathlib.Path:
  """A workdir with the tiny chatbot's config.json, tokenizer.model and checkpoint CHAT_STEPS."""
  for name in (CHAT_TRAIN_FILE, MULTIWOZ_VALIDATION):
    if not (shared_data / name).is_file():
      pytest.skip(f'{name} is not staged in {shared_data}: the tiny chatbot trains on it')
  config = chatbot.get_config('tiny')
  config.wandb.mode = 'disabled'
  config.data.data_dir = str(shared_data)
  config.num_train_steps = CHAT_STEPS
  config.batch_size = 8
  config.fast_compile = True
  config.data.max_eval_dialogues = 8
  workdir = tmp_path_factory.mktemp('chatbot_tiny')
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope='session')
def cli_env(shared_data, compile_cache_dir) -> dict[str, str]:
  """Environment of `python -m reformer_jax.{chat,evaluate}` subprocesses."""
  return {**os.environ, 'WANDB_MODE': 'disabled', 'JAX_PLATFORMS': 'cpu',
          'REFORMER_DATA_DIR': str(shared_data), 'JAX_COMPILATION_CACHE_DIR': str(compile_cache_dir),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))}
