"""reformer_jax.chat: the read-reply loop (empty lines, /reset, /quit, end of input, Ctrl-C) and
the command line on the tiny chatbot of conftest.py, through a pipe.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

from conftest import REPO
from reformer_jax import chat


class Echo:
  """A stand-in for `chat.Conversation`: replies with the length of what it was told."""

  def __init__(self):
    self.heard: list[str] = []
    self.resets = 0

  def reply(self, text: str) -> str:
    if text == 'interrupt me':
      raise KeyboardInterrupt  # Ctrl-C while a reply is being generated
    self.heard.append(text)
    return f'{len(text)} characters'

  def reset(self) -> None:
    self.resets += 1


def _lines(*lines: str, end: type[BaseException] = EOFError):
  """A `read_line` that gives `lines`, then raises `end` (EOFError: Ctrl-D or the pipe's end)."""
  it = iter(lines)

  def read_line() -> str:
    try:
      return next(it)
    except StopIteration:
      raise end() from None

  return read_line


# --------------------------------------------------------------------------- the loop


def test_loop_answers_each_nonempty_line_until_end_of_input():
  echo, out = Echo(), []
  status = chat.chat_loop(echo, _lines('hello', '', '   ', '\x00\x07', 'x' * 5000, '/reset',
                                       'مرحبا 🙂'), out.append, max_input_chars=100)
  assert status == 0
  assert echo.heard == ['hello', 'x' * 100, 'مرحبا 🙂'] and echo.resets == 1
  assert out == ['Person 2: 5 characters', 'Person 2: 100 characters', 'Person 2: 7 characters']


def test_loop_ends_quietly_on_ctrl_c_and_quit():
  echo, out = Echo(), []
  assert chat.chat_loop(echo, _lines('hi', end=KeyboardInterrupt), out.append) == 0  # at input
  assert out == ['Person 2: 2 characters']
  assert chat.chat_loop(echo, _lines('interrupt me', 'never read'), out.append) == 0  # in a reply
  assert chat.chat_loop(echo, _lines('/quit', 'never read'), out.append) == 0
  assert echo.heard == ['hi'] and len(out) == 1


# --------------------------------------------------------------------------- the command line


def _chat(workdir, env, **kwargs):
  return [sys.executable, '-m', 'reformer_jax.chat', f'--workdir={workdir}',
          '--max_reply_tokens=16'], dict(env=env, cwd=REPO, **kwargs)


def test_chat_through_a_pipe_replies_to_every_line(chat_workdir, cli_env):
  lines = ['I need a cheap hotel in the north.', '', '   ', 'very long line ' * 2000,
           'こんにちは 🙂 مرحبا \u200fשלום e\u0301 👩\u200d💻', 'bell\x07 escape\x1b[31m nul\x00',
           'Thanks, that is all.']
  stdin = ('\n'.join(lines) + '\n').encode() + b'undecodable \xff\xfe bytes\n'
  command, kwargs = _chat(chat_workdir, cli_env)
  proc = subprocess.run(command, input=stdin, capture_output=True, timeout=600, check=False,
                        **kwargs)
  stderr = proc.stderr.decode(errors='replace')
  assert proc.returncode == 0, stderr
  assert 'Traceback' not in stderr
  replies = proc.stdout.decode().splitlines()
  assert len(replies) == 6, replies  # one per non-empty line
  assert all(r.startswith('Person 2:') and 'Person 1:' not in r for r in replies)


def test_chat_ends_quietly_on_sigint(chat_workdir, cli_env):
  command, kwargs = _chat(chat_workdir, cli_env)
  with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, **kwargs) as proc:
    proc.stdin.write('Hello there.\n')
    proc.stdin.flush()
    assert proc.stdout.readline().startswith('Person 2:')  # loaded, waiting for the next line
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 0, stderr
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr


def test_chat_without_a_checkpoint_exits_with_one_line(tmp_path, chat_workdir, cli_env):
  for name in ('config.json', 'tokenizer.model'):
    shutil.copy(chat_workdir / name, tmp_path)
  command, kwargs = _chat(tmp_path, cli_env)
  proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                        timeout=300, check=False, **kwargs)
  assert proc.returncode == 1 and not proc.stdout
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'chat: no checkpoint in {tmp_path / "checkpoints"}: train first')
