"""Chat with a trained dialogue model: `python -m reformer_jax.chat --workdir=DIR`.

    python -m reformer_jax.chat --workdir=workdir/chatbot
    python -m reformer_jax.chat --workdir=workdir/chatbot --strategy=sample --temperature=0.7
    python -m reformer_jax.chat --workdir=workdir/chatbot --strategy=beam --beam=4
    printf 'I need a cheap hotel.\\nIn the north.\\n' | python -m reformer_jax.chat --workdir=DIR

Every line read, from a terminal or a pipe, is a Person 1 turn; the reply is printed on stdout as
one line `Person 2: <reply>` (anything else goes to stderr). The conversation is kept as the
"Person 1: ... Person 2: ..." text of the training data, and when it outgrows the model's length
its oldest turns are dropped (`reformer_jax.inference` builds the prompts, cuts the replies and
decodes with `reformer_jax.decode`; the strategy flags are `inference.DecodeOptions`).

Input: empty lines are skipped, control characters removed, and a line longer than
`--max_input_chars` keeps its end; any script, emoji or combining mark is fine. `/reset` starts
a new conversation. `/quit`, the end of input (Ctrl-D) and Ctrl-C end the chat with status 0; a
workdir without a checkpoint or tokenizer ends it at once with a one-line message and status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Protocol

import jax

from reformer_jax import host_memory, inference
from reformer_jax.data.dialogues import SPEAKER_LABELS, SYSTEM, USER

QUIT = ('/quit', '/exit')
RESET = '/reset'


class Responder(Protocol):
  """What `chat_loop` talks to (a `Conversation`, or a stand-in in tests)."""

  def reply(self, text: str) -> str: ...

  def reset(self) -> None: ...


class Conversation:
  """The turns so far and the model that answers them."""

  def __init__(self, model: inference.DialogueModel, options: inference.DecodeOptions):
    self.model, self.options = model, options
    self.turns: list[tuple[str, str]] = []
    self.key = jax.random.PRNGKey(options.seed)
    self.replies = 0

  def reset(self) -> None:
    self.turns = []

  def reply(self, text: str) -> str:
    """Adds Person 1's (cleaned, non-empty) `text`, then the model's reply, which it returns."""
    self.turns.append((USER, text))
    prompt = inference.next_reply_prompt(self.model, self.turns, self.options)
    del self.turns[:prompt.first_turn]  # turns that no longer fit never will again
    reply, = inference.generate_replies(self.model, [prompt.ids], self.options,
                                        jax.random.fold_in(self.key, self.replies))
    self.replies += 1
    if reply:
      self.turns.append((SYSTEM, reply))
    return reply


def chat_loop(responder: Responder, read_line: Callable[[], str], write: Callable[[str], None],
              *, max_input_chars: int | None = None) -> int:
  """Answers each non-empty line until `/quit`, end of input or Ctrl-C; returns the status, 0.

  Args:
    responder: gives the reply to a line (and forgets the conversation on `/reset`).
    read_line: the next line; raises EOFError at the end (as `input` does).
    write: prints one output line.
    max_input_chars: longer lines keep their last characters.
  """
  try:
    while True:
      try:
        line = read_line()
      except EOFError:
        return 0
      text = inference.clean_text(line, max_input_chars)
      if not text:
        continue
      if text in QUIT:
        return 0
      if text == RESET:
        responder.reset()
        continue
      write(f'{SPEAKER_LABELS[SYSTEM]}: {responder.reply(text)}'.rstrip())
  except KeyboardInterrupt:
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m reformer_jax.chat',
                                   description='Chat with a trained dialogue model.')
  inference.add_model_flags(parser)
  inference.add_decode_flags(parser)
  parser.add_argument('--max_input_chars', type=int, default=2000,
                      help='longer input lines keep their last characters (default 2000)')
  parser.add_argument('--verbose', action='store_true', help='log loading to stderr')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  host_memory.keep_freed_memory()  # before the first computation
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                      format='%(levelname)s %(message)s', force=True)
  for stream in (sys.stdin, sys.stdout):  # undecodable input bytes must not end the chat
    if hasattr(stream, 'reconfigure'):
      stream.reconfigure(errors='replace')
  interactive = sys.stdin.isatty()
  try:
    try:
      model = inference.load_model(args.workdir, step=args.step, hash_seed=args.hash_seed)
      options = inference.DecodeOptions.from_args(args)
      options.validate(model)
    except (inference.ModelLoadError, ValueError) as e:
      print(f'chat: {e}', file=sys.stderr)
      return 1
    if interactive:
      import readline  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      print(f'Chatting with {args.workdir} (step {model.step}, {options.strategy}); Ctrl-D or '
            f'/quit ends, {RESET} starts over.', file=sys.stderr)
    prompt = f'{SPEAKER_LABELS[USER]}: ' if interactive else ''
    status = chat_loop(Conversation(model, options), lambda: input(prompt),
                       lambda line: print(line, flush=True), max_input_chars=args.max_input_chars)
  except KeyboardInterrupt:  # Ctrl-C while loading
    status = 0
  except BrokenPipeError:  # the reader of stdout went away (`| head`)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  if interactive:
    print(file=sys.stderr)  # the shell prompt starts on a new line
  return status


if __name__ == '__main__':
  sys.exit(main())
