"""A trained dialogue model read back from its workdir, and its replies: what `reformer_jax.chat`
and `reformer_jax.evaluate` share.

    model = load_model('workdir/chatbot')             # newest checkpoint, its tokenizer
    options = DecodeOptions(strategy='beam', beam=4)
    prompt = next_reply_prompt(model, [(USER, 'I need a hotel in the north.')], options)
    reply, = generate_replies(model, [prompt.ids], options, jax.random.PRNGKey(0))

Loading. `config.json` gives the model and `data.seq_len`, `tokenizer.model` the pieces, and only
the parameters of the checkpoint (the newest, `--step=N`, or `--step=best`: the lowest validation
loss) are restored (`Checkpointer.restore_params`, an Orbax partial restore into
`jax.eval_shape` of `train.init_params`): no optimizer state is built or read. A workdir
without a config, tokenizer or checkpoint raises `ModelLoadError`, whose message says what is
missing and how to get it.

Prompts are the training rows (`data.encode_dialogue`): id 0 (the model reads its inputs
shifted right), then the sentencepiece tokens of `format_dialogue`'s "Person 1: <user> Person 2:
<system> ..." up to and including the label "Person 2:" of the turn to generate; the reply starts
with the space after it, as in training. Prompt and reply must fit in the `seq_len` positions the
model was trained on, so the prompt gets `seq_len - max_reply_tokens`: the oldest whole turns are
dropped (training's `truncate='turns'`), and when even the newest turn does not fit, its newest
tokens are kept.

Stopping. Training rows carry EOS only after a whole dialogue, so mid-conversation the model ends
a reply by starting the next "Person 1:" label. Decoding stops at EOS or at the first piece of
the speaker labels (`DialogueModel.stop_ids`), and `cut_reply` keeps the text before any label.

Determinism. LSH rotations come from a fixed `hash_seed` (the config's, else `--hash_seed`,
default 0) in decoding and in teacher-forced scoring alike, so greedy replies depend only on the
checkpoint and the prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from reformer_jax import checkpointing, data, decode, storage, tracking, train
from reformer_jax.data.dialogues import SPEAKER_LABELS, SYSTEM, Dialogue
from reformer_jax.data.tokenizer import EOS_ID, PAD_ID, TOKENIZER_FILENAME, SentencePieceTokenizer
from reformer_jax.model_config import ModelConfig

STRATEGIES = ('greedy', 'sample', 'beam', 'mbr')
MIN_PROMPT_TOKENS = 16      # what a prompt keeps at least: a label and a few words of context
MIN_PROMPT_WIDTH = 64       # prompts are padded to 64, 128, 256, ... (one compilation each)
_LABEL = re.compile('|'.join(rf'{re.escape(label)}\s*:' for label in SPEAKER_LABELS.values()))
TRAIN_HINT = 'python -m reformer_jax.main --config=configs/chatbot.py --workdir=DIR'
BEST = 'best'               # --step=best: the checkpoint with the lowest validation loss


class ModelLoadError(Exception):
  """A workdir holds no usable dialogue model; the message says what is missing and the fix."""


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class DialogueModel:
  """A restored dialogue `ReformerLM` (or, loaded with `task='translation'`, a translation
  `ReformerEncoderDecoder`) and what inference needs around it."""
  cfg: ModelConfig                  # the architecture, with `hash_seed` fixed
  params: Any                       # the `params` collection
  tokenizer: SentencePieceTokenizer
  seq_len: int                      # training row length: a prompt and its reply fit in it
  step: int                         # the checkpoint's step
  workdir: str
  stop_ids: tuple[int, ...]         # EOS and, when it is one piece, the labels' first piece
  src_len: int | None = None        # translation: source row length

  def prompt_len(self, options: DecodeOptions) -> int:
    """Positions left to a prompt (its leading id 0 included) by `options.max_reply_tokens`."""
    return self.seq_len - options.max_reply_tokens


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  """`--workdir`, `--step` and `--hash_seed`: which model `load_model` reads."""
  parser.add_argument('--workdir', required=True,
                      help='workdir of a dialogue training run (config.json, tokenizer.model, '
                           'checkpoints/)')
  parser.add_argument('--step', type=step_arg, default=None,
                      help="checkpoint step to load, or 'best': the kept checkpoint with the "
                           'lowest validation loss (eval/loss in metrics.jsonl); default: the '
                           'newest')
  parser.add_argument('--hash_seed', type=int, default=None,
                      help="seed of the fixed LSH rotations; default: the config's "
                           'model.hash_seed, else 0')


def step_arg(text: str) -> int | str:
  """`--step`: a checkpoint step, or 'best'."""
  if text == BEST:
    return BEST
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--step={text}: pass a checkpoint step (an integer) or "
                                     f"'{BEST}'") from None


def best_step(workdir: str | os.PathLike[str], steps: Sequence[int]) -> int:
  """Of the checkpoint `steps`, the one with the lowest validation loss: `eval/loss` of
  `<workdir>/metrics.jsonl` at that step (the last record of a step, if a resumed run logged it
  again). Ties go to the earlier step.

  Raises:
    ModelLoadError: no metrics.jsonl, or no checkpoint step has a validation loss.
  """
  try:
    records = tracking.read_metrics(workdir)
  except FileNotFoundError:
    raise ModelLoadError(f'--step={BEST} needs {tracking.METRICS_FILE} in {workdir} (training '
                         f'writes it); pass --step= one of {sorted(steps)}') from None
  losses = {r['step']: r['eval/loss'] for r in records if 'eval/loss' in r}
  scored = sorted((losses[s], s) for s in steps if s in losses)
  if not scored:
    raise ModelLoadError(
        f'--step={BEST}: none of the checkpoints {sorted(steps)} of {workdir} has a validation '
        f'loss in {tracking.METRICS_FILE} (evaluated steps: {sorted(losses) or "none"}); train '
        f'with config.eval_every_steps a multiple of config.checkpoint_every_steps and '
        f'config.max_checkpoints_to_keep=0, or pass --step= one of {sorted(steps)}')
  return scored[0][1]


def load_model(workdir: str | os.PathLike[str], *, step: int | str | None = None,
               hash_seed: int | None = None, task: str = 'dialogue') -> DialogueModel:
  """Restores the parameters of checkpoint `step` (default: the newest; 'best': `best_step`)
  of a `task` run ('dialogue', or 'translation' for an encoder-decoder).

  Raises:
    ModelLoadError: no such workdir, no config.json, not a dialogue run, no tokenizer.model, no
      checkpoint (or not `step`), or a checkpoint that cannot be read.
  """
  root = storage.path(workdir)
  if not root.is_dir():
    raise ModelLoadError(f'workdir {workdir} does not exist: pass the --workdir of a dialogue '
                         f'training run ({TRAIN_HINT})')
  if not (root / checkpointing.CONFIG_FILE).is_file():
    raise ModelLoadError(f'no {checkpointing.CONFIG_FILE} in {workdir}: it is not a training '
                         f'workdir ({TRAIN_HINT} writes one)')
  config = checkpointing.load_config_dict(workdir)
  trained = config.get('data', {}).get('task')
  if trained != task:
    hint = TRAIN_HINT if task == 'dialogue' else TRAIN_HINT.replace('chatbot', task)
    raise ModelLoadError(f'{workdir} was trained with data.task={trained!r}: this needs a {task} '
                         f'model ({hint})')
  tokenizer_path = root / TOKENIZER_FILENAME
  if not tokenizer_path.is_file():
    raise ModelLoadError(f'no tokenizer in {workdir} ({TOKENIZER_FILENAME} is missing): training '
                         f'writes it at its first start; copy it back beside checkpoints/')
  if not (root / checkpointing.CHECKPOINT_DIR).is_dir():  # checked before Orbax creates it
    raise _no_checkpoint(root / checkpointing.CHECKPOINT_DIR)
  cfg = ModelConfig.from_dict(config['model'])
  if hash_seed is not None or cfg.hash_seed is None:
    cfg = cfg.replace(hash_seed=hash_seed or 0)
  tokenizer = SentencePieceTokenizer(tokenizer_path.read_bytes())
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ModelLoadError(f'{tokenizer_path} has {tokenizer.vocab_size} pieces but the model only '
                         f'{cfg.vocab_size}: it belongs to another run; restore the right one')
  seq_len = int(config['data']['seq_len'])
  src_len = int(config['data']['src_len']) if task == 'translation' else None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.eval_shape(functools.partial(train.init_params, train.make_model(cfg, task),
                                              seq_len, src_len=src_len), jax.random.PRNGKey(0))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  checkpointer = checkpointing.Checkpointer(workdir)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise _no_checkpoint(checkpointer.directory)
    step = max(steps) if step is None else best_step(workdir, steps) if step == BEST else step
    if step not in steps:
      raise ModelLoadError(f'no checkpoint {step} in {checkpointer.directory}: pass --step= one '
                           f'of {sorted(steps)}')
    try:
      params = checkpointer.restore_params(step, abstract)
    except checkpointing.UNREADABLE_ERRORS as e:
      older = sorted(s for s in steps if s < step)
      raise ModelLoadError(
          f'checkpoint {step} in {checkpointer.directory} cannot be read ({type(e).__name__}: '
          f'{(str(e).strip().splitlines() or [""])[0][:200]})'
          + (f'; pass --step= one of {older}' if older else '')) from e
  finally:
    checkpointer.close()
  return DialogueModel(cfg=cfg, params=params, tokenizer=tokenizer, seq_len=seq_len, step=step,
                       workdir=os.fspath(workdir), stop_ids=stop_ids_of(tokenizer),
                       src_len=src_len)


def _no_checkpoint(directory) -> ModelLoadError:
  return ModelLoadError(f'no checkpoint in {directory}: train first ({TRAIN_HINT}), or wait for '
                        f'its first checkpoint (every config.checkpoint_every_steps, and the last)')


def stop_ids_of(tokenizer) -> tuple[int, ...]:
  """EOS, and the first piece of the speaker labels when they share one that is the whole word
  'Person' (so a reply may still say 'person')."""
  firsts = {tuple(tokenizer.encode(f'{label}:'))[:1] for label in SPEAKER_LABELS.values()}
  if len(firsts) == 1 and () not in firsts:
    (first,), = firsts
    if tokenizer.decode([first]).strip() == 'Person':
      return (EOS_ID, int(first))
  return (EOS_ID,)


# --------------------------------------------------------------------------- decoding options


def _option(default, help_text: str):
  return dataclasses.field(default=default, metadata={'help': help_text})


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How replies are generated; every field is also a command-line flag (`add_decode_flags`)."""
  strategy: str = _option('greedy', f'one of {", ".join(STRATEGIES)}')
  temperature: float = _option(0.8, 'sample, mbr: softmax temperature')
  top_k: int = _option(0, 'sample, mbr: keep the k most likely pieces; 0: all')
  top_p: float = _option(0.95, 'sample, mbr: keep the most likely pieces up to this mass; 1: all')
  beam: int = _option(4, 'beam: hypotheses per prompt')
  alpha: float = _option(0.6, 'beam: GNMT length penalty exponent; 0: none')
  mbr_samples: int = _option(8, 'mbr: sampled candidates per prompt, the one with the highest '
                                'mean ROUGE-L against the others wins')
  max_reply_tokens: int = _option(48, 'longest reply, in tokenizer pieces')
  seed: int = _option(0, 'sample, mbr: PRNG seed')

  def validate(self, model: DialogueModel) -> None:
    """Raises ValueError naming the flag and the fix."""
    if self.strategy not in STRATEGIES:
      raise ValueError(f'--strategy={self.strategy}: use one of {", ".join(STRATEGIES)}')
    room = model.seq_len - MIN_PROMPT_TOKENS
    if not 1 <= self.max_reply_tokens <= room:
      raise ValueError(f'--max_reply_tokens={self.max_reply_tokens} must be in [1, {room}]: the '
                       f'model reads {model.seq_len} positions and a prompt needs '
                       f'{MIN_PROMPT_TOKENS}')
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f'--temperature={self.temperature}, --top_p={self.top_p}, '
                       f'--top_k={self.top_k}: use temperature >= 0, 0 < top_p <= 1, top_k >= 0')
    if not 1 <= self.beam <= model.cfg.vocab_size:
      raise ValueError(f'--beam={self.beam} must be in [1, {model.cfg.vocab_size}]')
    if self.mbr_samples < 1:
      raise ValueError(f'--mbr_samples={self.mbr_samples} must be >= 1')

  @classmethod
  def from_args(cls, args: argparse.Namespace) -> DecodeOptions:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_decode_flags(parser: argparse.ArgumentParser) -> None:
  """One `--<field>` flag per `DecodeOptions` field, with its default and help."""
  for field in dataclasses.fields(DecodeOptions):
    choices = STRATEGIES if field.name == 'strategy' else None
    parser.add_argument(f'--{field.name}', type=type(field.default), default=field.default,
                        choices=choices, help=f'{field.metadata["help"]} (default {field.default})')


# --------------------------------------------------------------------------- text and prompts


def clean_text(text: str, max_chars: int | None = None) -> str:
  """A line as a dialogue turn: control characters become spaces (lone surrogates U+FFFD), runs
  of whitespace one space, ends stripped. Over `max_chars`, the newest (last) characters stay.

  Letters of any script, emoji, combining marks and direction marks are kept as they are.
  """
  if max_chars and len(text) > 2 * max_chars:
    text = text[-2 * max_chars:]
  text = ''.join(' ' if unicodedata.category(c) == 'Cc' else
                 '\ufffd' if unicodedata.category(c) == 'Cs' else c for c in text)
  text = ' '.join(text.split())
  if max_chars and len(text) > max_chars:
    text = text[-max_chars:].lstrip()
  return text


@dataclasses.dataclass(frozen=True)
class Prompt:
  """The model input for one Person 2 reply."""
  ids: np.ndarray     # int32 [P]: id 0, then the tokens of "Person 1: ... Person 2:"
  turn: int           # index of the Person 2 turn it asks for
  first_turn: int     # index of the oldest turn it holds (whole, or its newest tokens)


def reply_prompts(dialogue: Dialogue, tokenizer, max_len: int) -> list[Prompt]:
  """One prompt per Person 2 turn: the turns before it and its label, as training tokenized them.

  Args:
    dialogue: the turns; every Person 2 turn gets a prompt.
    tokenizer: the model's tokenizer.
    max_len: positions a prompt may take (its leading id 0 included), >= `MIN_PROMPT_TOKENS`.
  Returns:
    Prompts in turn order. The oldest whole turns that do not fit are dropped; when the turn
    right before the label does not fit by itself, its newest tokens are kept.
  """
  if max_len < MIN_PROMPT_TOKENS:
    raise ValueError(f'max_len={max_len}: a prompt needs at least {MIN_PROMPT_TOKENS} positions')
  ids, reply, turn_starts = data.encode_dialogue(dialogue, tokenizer)
  bounds = np.append(turn_starts, len(ids))
  budget = max_len - 1  # after the leading id 0
  prompts = []
  for i, (speaker, _) in enumerate(dialogue.turns):
    if speaker != SYSTEM:
      continue
    start, end = bounds[i], bounds[i + 1]
    in_reply = np.flatnonzero(reply[start:end])
    label_end = start + (in_reply[0] if in_reply.size else end - start)  # after "Person 2:"
    fits = np.flatnonzero(label_end - bounds[:i] <= budget)  # whole turns j..i-1 fit
    if fits.size:
      first, cut = int(fits[0]), bounds[fits[0]]
    else:  # the newest turn alone is too long (or there is none): its newest tokens
      first, cut = max(i - 1, 0), max(label_end - budget, start if i == 0 else 0)
    prompts.append(Prompt(np.concatenate([[PAD_ID], ids[cut:label_end]]).astype(np.int32),
                          turn=i, first_turn=first))
  return prompts


def next_reply_prompt(model: DialogueModel, turns: Sequence[tuple[str, str]],
                      options: DecodeOptions) -> Prompt:
  """The prompt for the Person 2 reply that follows `turns` (`(speaker, text)` pairs)."""
  placeholder = Dialogue('next', [*turns, (SYSTEM, '.')])  # only its label reaches the prompt
  return reply_prompts(placeholder, model.tokenizer, model.prompt_len(options))[-1]


def cut_reply(ids: Sequence[int] | np.ndarray, tokenizer,
              stop_ids: Sequence[int] = (EOS_ID,)) -> str:
  """Generated ids -> the reply: the text before the first stop id and before any speaker label
  ("Person 1:" where the model starts the next turn), cleaned to one line."""
  ids = [int(i) for i in ids]
  stops = [k for k, i in enumerate(ids) if i in stop_ids]
  text = tokenizer.decode(ids[:stops[0]] if stops else ids)
  label = _LABEL.search(text)
  return clean_text(text[:label.start()] if label else text)


# --------------------------------------------------------------------------- generation


def _width(length: int, limit: int) -> int:
  """Padded prompt width: the power of two from `MIN_PROMPT_WIDTH` that holds `length`, at most
  `limit` (a few widths, so a few compilations, and little padding to feed)."""
  width = MIN_PROMPT_WIDTH
  while width < length:
    width *= 2
  return min(width, limit)


def generate_replies(model: DialogueModel, prompts: Sequence[np.ndarray], options: DecodeOptions,
                     rng: jax.Array, *, rows: int | None = None) -> list[str]:
  """Replies to a batch of prompts (`Prompt.ids`, of any lengths up to `model.prompt_len`).

  Prompts are left-padded (masked) to a common width; `rows` pads the batch with one-token rows
  to a fixed size, so that every batch of an evaluation shares its compilation. Greedy and
  sampling use `decode.generate`, beam `decode.beam_search`, mbr `decode.mbr_decode` (one prompt
  at a time, `mbr_samples` rows each).
  """
  limit = model.prompt_len(options)
  longest = max(len(p) for p in prompts)
  if longest > limit:
    raise ValueError(f'a prompt of {longest} positions exceeds the {limit} left by '
                     f'--max_reply_tokens={options.max_reply_tokens}: build it with reply_prompts')
  width = _width(longest, limit)
  rows = max(rows or 0, len(prompts))
  tokens = np.full((rows, width), PAD_ID, np.int32)
  mask = np.zeros((rows, width), bool)
  mask[:, -1] = True  # a padding row holds one real token (id 0)
  for r, p in enumerate(prompts):
    tokens[r, width - len(p):] = p
    mask[r, width - len(p):] = True
  common = dict(max_new_tokens=options.max_reply_tokens, cache_len=model.seq_len,
                eos_id=model.stop_ids)
  sampling = dict(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
  cut = functools.partial(cut_reply, tokenizer=model.tokenizer, stop_ids=model.stop_ids)
  if options.strategy == 'mbr':
    return [decode.mbr_decode(model.cfg, model.params, tokens[r], cut, prompt_mask=mask[r],
                              n_samples=options.mbr_samples, rng=jax.random.fold_in(rng, r),
                              **sampling, **common)[0] for r in range(len(prompts))]
  if options.strategy == 'beam':
    (out, _), _ = decode.beam_search(model.cfg, model.params, tokens, mask, beam_size=options.beam,
                                     alpha=options.alpha, **common)
  else:
    if options.strategy == 'greedy':
      sampling = dict(temperature=0.0)
    out = decode.generate(model.cfg, model.params, tokens, mask, rng=rng, **sampling, **common)
  return [cut(row) for row in np.asarray(out)[:len(prompts)]]
