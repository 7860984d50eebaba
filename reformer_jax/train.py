"""Training and evaluation of a `ReformerLM`: `train_and_evaluate(config, workdir)`.

One jitted step over a `('data',)` device mesh (`reformer_jax.sharding`): the batch is split over
every device, the train state is replicated and donated to the step. The state is built
abstract-first (`jax.eval_shape`, then `jax.jit(init, out_shardings=...)`), or restored into
that abstract state from the newest readable checkpoint of the workdir. Randomness comes from one
root key: the step draws its dropout and LSH hash rotations from `fold_in(key, step)`, and the
data of step `s` is a pure function of (data seed, `s`), so a resumed run continues exactly as
an uninterrupted one would (bitwise on CPU).

Per step the host only dispatches: the step's metrics are read back while the next step runs.
A non-finite loss, gradient or parameter norm stops training with `NonFiniteError`; checkpoints
are only written after their step's metrics were checked, so the last checkpoint stays good.
SIGTERM (preemption) saves a checkpoint at the current step, waits for it and returns.

Tasks (`config.data.task`): 'duplication' (the paper's `0w0w` copy task), 'dialogue' (Person 1/
Person 2 dialogues with a sentencepiece tokenizer kept in the workdir), 'text' (byte-level LM),
'translation' (a `ReformerEncoderDecoder` on sentence pairs, e.g. Multi30k, with a shared
sentencepiece vocabulary kept in the workdir; see `configs/translation.py`).

The workdir is a local folder or a bucket URL (`gs://bucket/run`); see `reformer_jax.storage`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from reformer_jax import checkpointing, data, sharding, storage, tracking
from reformer_jax.model_config import ModelConfig
from reformer_jax.models import ReformerEncoderDecoder, ReformerLM

TASKS = ('duplication', 'dialogue', 'text', 'translation')
OPTIMIZERS = ('adamw', 'adafactor')
SCHEDULES = ('rsqrt', 'cosine', 'constant')
INIT, TRAIN, EVAL = 0, 1, 2  # fold_in tags of the root key


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds: the number of updates applied, parameters, optimizer state."""
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any


class NonFiniteError(FloatingPointError):
  """Training produced a NaN or Inf; raised with the step and how to recover."""


# --------------------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks every training field once, up front; returns the model's `ModelConfig`.

  Raises:
    ValueError: naming the first bad field and how to fix it.
  """
  def fail(msg):
    raise ValueError(f'config.{msg}')

  model_cfg = ModelConfig.from_dict(config.model)
  d = config.data
  if d.task not in TASKS:
    fail(f"data.task={d.task!r}: use one of {TASKS}")
  if not isinstance(d.seq_len, int) or d.seq_len < 2:
    fail(f'data.seq_len={d.seq_len!r} must be an int >= 2')
  if d.seq_len > model_cfg.max_len:
    fail(f'model.max_len={model_cfg.max_len} is shorter than data.seq_len={d.seq_len}: set '
         f'model.max_len={d.seq_len}')
  chunked = any(t in ('lsh', 'local') for t in model_cfg.attention_types)
  if chunked and d.seq_len > model_cfg.chunk_len and d.seq_len % model_cfg.chunk_len:
    fail(f'data.seq_len={d.seq_len} is not a multiple of model.chunk_len={model_cfg.chunk_len}: '
         f'use seq_len={-(-d.seq_len // model_cfg.chunk_len) * model_cfg.chunk_len} or a '
         f'chunk_len that divides it')
  if d.task == 'duplication' and (d.seq_len < 4 or d.seq_len % 2):
    fail(f'data.seq_len={d.seq_len}: the duplication task needs an even length >= 4')
  if d.task == 'duplication' and model_cfg.vocab_size < 3:
    fail(f'model.vocab_size={model_cfg.vocab_size}: duplication needs >= 3 (separator + symbols)')
  if d.task == 'text' and model_cfg.vocab_size < data.BYTE_VOCAB_SIZE:
    fail(f'model.vocab_size={model_cfg.vocab_size}: the byte-level text task needs '
         f'{data.BYTE_VOCAB_SIZE}')
  if d.task in ('dialogue', 'translation') and model_cfg.vocab_size < 16:
    fail(f'model.vocab_size={model_cfg.vocab_size}: the sentencepiece tokenizer needs >= 16')
  if d.task == 'translation':
    for name in ('corpus', 'src_lang', 'tgt_lang', 'src_len', 'max_train_pairs', 'max_eval_pairs'):
      if name not in d:
        fail(f'data.{name} is missing: the translation task needs data.corpus, src_lang, '
             f'tgt_lang, src_len, max_train_pairs and max_eval_pairs (see configs/translation.py)')
    if not isinstance(d.src_len, int) or not 2 <= d.src_len <= model_cfg.max_len:
      fail(f'data.src_len={d.src_len!r} must be an int in [2, model.max_len={model_cfg.max_len}]')
    if chunked and d.src_len > model_cfg.chunk_len and d.src_len % model_cfg.chunk_len:
      fail(f'data.src_len={d.src_len} is not a multiple of model.chunk_len={model_cfg.chunk_len}')
    widths = tuple(d.get('length_buckets', ()) or ())
    if widths and (not all(isinstance(w, int) and 2 <= w <= model_cfg.max_len for w in widths)
                   or max(widths) < max(d.src_len, d.seq_len)):
      fail(f'data.length_buckets={widths}: ints in [2, model.max_len={model_cfg.max_len}] whose '
           f'largest is >= data.src_len and data.seq_len ({d.src_len}, {d.seq_len}); () turns '
           f'length-grouped batches off')
    if widths and chunked:
      fail(f'data.length_buckets={widths} needs full attention (chunked attention needs widths '
           f'that are multiples of model.chunk_len); set data.length_buckets=()')
  if config.optimizer not in OPTIMIZERS:
    fail(f'optimizer={config.optimizer!r}: use one of {OPTIMIZERS}')
  if config.schedule not in SCHEDULES:
    fail(f'schedule={config.schedule!r}: use one of {SCHEDULES}')
  if not config.learning_rate > 0:
    fail(f'learning_rate={config.learning_rate} must be > 0')
  for name in ('num_train_steps', 'log_every_steps', 'grad_accum_steps', 'batch_size',
               'eval_batch_size'):
    if not isinstance(config[name], int) or config[name] < 1:
      fail(f'{name}={config[name]!r} must be an int >= 1')
  for name in ('warmup_steps', 'eval_every_steps', 'checkpoint_every_steps', 'max_eval_batches',
               'max_checkpoints_to_keep', 'num_devices', 'profile_steps'):
    if not isinstance(config[name], int) or config[name] < 0:
      fail(f'{name}={config[name]!r} must be an int >= 0 (0 turns it off or means "all")')
  if config.schedule == 'cosine' and config.warmup_steps >= config.num_train_steps:
    fail(f'warmup_steps={config.warmup_steps} must be < num_train_steps='
         f'{config.num_train_steps} for the cosine schedule')
  if config.grad_clip_norm < 0 or config.weight_decay < 0:
    fail('grad_clip_norm and weight_decay must be >= 0 (0 turns them off)')
  if config.batch_size % config.grad_accum_steps:
    fail(f'batch_size={config.batch_size} is not divisible by grad_accum_steps='
         f'{config.grad_accum_steps}: use a batch_size that is a multiple of it')
  for n in config.eval_n_hashes:
    if not isinstance(n, int) or n < 0:
      fail(f'eval_n_hashes={config.eval_n_hashes!r}: give ints >= 0 (0 = full attention)')
  if config.eval_n_hashes and not model_cfg.shared_qk:
    fail('eval_n_hashes needs model.shared_qk=True: LSH evaluation reuses the shared query/key '
         'projection of the trained attention layers')
  if config.eval_full_self and not model_cfg.shared_qk:
    fail('eval_full_self needs model.shared_qk=True: it evaluates the shared query/key '
         'attention with each token allowed to attend to its own key')
  tracking.wandb_mode(config.wandb.mode)  # raises on an unknown mode
  return model_cfg


# --------------------------------------------------------------------------- optimizer


def make_schedule(config) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then rsqrt, cosine or constant, by update count."""
  lr, warmup = config.learning_rate, config.warmup_steps
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, config.num_train_steps, end_value=lr * config.final_lr_fraction)
  if config.schedule == 'constant':
    decay = optax.constant_schedule(lr)
  else:  # rsqrt: lr * sqrt(warmup / step), continuous at the end of warmup
    decay = lambda count: lr * jax.lax.rsqrt(1.0 + count / max(warmup, 1))
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _decay_mask(params):
  """Weight decay on matrices and embeddings, not on biases and norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then AdamW or Adafactor."""
  if config.optimizer == 'adamw':
    opt = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                      weight_decay=config.weight_decay, mask=_decay_mask)
  else:
    opt = optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None,
                          weight_decay_mask=_decay_mask)
  if config.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
  return opt


# --------------------------------------------------------------------------- step functions


def decoder_inputs(targets: jax.Array) -> jax.Array:
  """`[B, L]` targets -> inputs shifted right by one, id 0 in front (the model reads x[:t])."""
  return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


def input_mask(targets: jax.Array) -> jax.Array:
  """`[B, L]` True at real input tokens: the leading start position and non-padding tokens."""
  real = targets[:, :-1] != data.PAD_ID
  return jnp.concatenate([jnp.ones_like(real[:, :1]), real], axis=1)


def token_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
  """Weighted sums over tokens: cross-entropy, correct predictions and the weight itself."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {'loss': jnp.sum(loss * weights), 'correct': jnp.sum(correct * weights),
          'weight': jnp.sum(weights)}


# Float32 logits up to this size are made whole; beyond, in chunks of at most LOSS_CHUNK_BYTES.
LOSS_LOGITS_BYTES = 2 ** 28
LOSS_CHUNK_BYTES = 2 ** 26


def chunked_token_sums(logits_fn, features: jax.Array, targets: jax.Array, weights: jax.Array, *,
                       chunk_len: int | None = None) -> dict[str, jax.Array]:
  """`token_sums(logits_fn(features), targets, weights)` without the whole `[B, L, V]` logits.

  The positions go in chunks under `lax.map` of a rematerialized function, so one chunk's
  logits exist at a time, in the forward and in the backward pass (which recomputes them).

  Args:
    logits_fn: `[B, l, D]` features -> `[B, l, V]` logits, e.g. the model's output head.
    features: `[B, L, D]`.
    targets, weights: `[B, L]`.
    chunk_len: positions per chunk, dividing L; None: all at once while the float32 logits
      take at most `LOSS_LOGITS_BYTES`, else chunks of at most `LOSS_CHUNK_BYTES` of logits.
  """
  batch, length = targets.shape
  if chunk_len is None:
    logits_bytes = 4 * batch * length * jax.eval_shape(logits_fn, features[:, :1]).shape[-1]
    n = 1 if logits_bytes <= LOSS_LOGITS_BYTES else -(-logits_bytes // LOSS_CHUNK_BYTES)
    chunk_len = length // next(d for d in range(min(n, length), length + 1) if length % d == 0)
  if chunk_len >= length:
    return token_sums(logits_fn(features), targets, weights)
  if length % chunk_len:
    raise ValueError(f'chunked_token_sums: chunk_len {chunk_len} does not divide the length '
                     f'{length}; pick a divisor (or None for automatic)')

  def split(x):  # [B, L, ...] -> [L / chunk_len, B, chunk_len, ...]
    return x.reshape(batch, length // chunk_len, chunk_len, *x.shape[2:]).swapaxes(0, 1)

  def chunk_sums(args):
    f, t, w = args
    return token_sums(logits_fn(f), t, w)

  sums = jax.lax.map(jax.checkpoint(chunk_sums, prevent_cse=False),
                     (split(features), split(targets), split(weights)))
  return jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)


def make_model(model_cfg: ModelConfig, task: str) -> ReformerLM | ReformerEncoderDecoder:
  """The task's model: an encoder-decoder for 'translation', else a decoder-only LM."""
  return ReformerEncoderDecoder(model_cfg) if task == 'translation' else ReformerLM(model_cfg)


def _bucket_balance(variables) -> jax.Array:
  """The per-layer LSH bucket balance the model sowed into 'diagnostics', flat (empty if none)."""
  balance = jax.tree.leaves(variables.get('diagnostics', {}))
  return jnp.concatenate([jnp.ravel(b) for b in balance]) if balance else jnp.zeros((0,))


def _forward_translation(model: ReformerEncoderDecoder, params, batch, key, *, train: bool):
  """Teacher-forced sums of an encoder-decoder batch (`src`, target `inputs`, `weights`).

  Target rows hold their padding at the end and the decoder is causal, so only the source needs
  a mask (it keeps encoder and cross-attention off padding).
  """
  src_mask = batch['src'] != data.PAD_ID
  logits, variables = model.apply({'params': params}, batch['src'],
                                  decoder_inputs(batch['inputs']), src_mask=src_mask, rng=key,
                                  train=train, mutable=['diagnostics'])
  balance = _bucket_balance(variables)
  return token_sums(logits, batch['inputs'], batch['weights']), balance


def _forward(model: ReformerLM, params, batch, key, *, use_mask: bool, train: bool):
  if isinstance(model, ReformerEncoderDecoder):
    return _forward_translation(model, params, batch, key, train=train)
  mask = input_mask(batch['inputs']) if use_mask else None
  features, variables = model.apply({'params': params}, decoder_inputs(batch['inputs']),
                                    mask=mask, rng=key, train=train, mutable=['diagnostics'],
                                    method=ReformerLM.features)
  balance = _bucket_balance(variables)
  logits_fn = lambda x: model.apply({'params': params}, x, method=ReformerLM.logits)
  return chunked_token_sums(logits_fn, features, batch['inputs'], batch['weights']), balance


def train_step(state: TrainState, batch: dict[str, jax.Array], root_key: jax.Array, *,
               model: ReformerLM, tx: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum_steps: int = 1, use_mask: bool = False):
  """One update on a global batch (`grad_accum_steps` micro-batches); returns (state, metrics).

  The loss is the weighted token mean over the whole batch, so accumulating over micro-batches
  gives the same gradient as one big batch. Metrics are device scalars (and the per-layer LSH
  bucket balance); nothing is read back here.
  """
  key = jax.random.fold_in(root_key, state.step)

  def loss_fn(params, micro, micro_key):
    sums, balance = _forward(model, params, micro, micro_key, use_mask=use_mask, train=True)
    return sums['loss'], (sums, balance)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (_, (sums, balance)), grads = grad_fn(state.params, batch, key)
  else:
    # [B, ...] -> [k, B / k, ...] taking every k-th row, so each device's rows stay on it.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps,
                                             *x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, inputs):
      micro_batch, i = inputs
      (_, aux), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (grads, aux)), None

    (_, zero_aux), zero_grads = jax.eval_shape(
        grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero_grads, zero_aux))
    (grads, (sums, balance)), _ = jax.lax.scan(accumulate, zeros,
                                               (micro, jnp.arange(grad_accum_steps)))
    balance = balance / grad_accum_steps
  weight = jnp.maximum(sums['weight'], 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': sums['loss'] / weight, 'accuracy': sums['correct'] / weight,
             'tokens': sums['weight'], 'grad_norm': optax.tree.norm(grads),
             'param_norm': optax.tree.norm(params), 'learning_rate': schedule(state.step),
             'bucket_balance': balance}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, key, *, model: ReformerLM, use_mask: bool = False):
  """Weighted sums (loss, correct, weight) of one evaluation batch."""
  sums, _ = _forward(model, params, batch, key, use_mask=use_mask, train=False)
  return sums


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class TaskData:
  """What a task gives the trainer."""
  train: Any                     # a `data.make_batches` source
  eval: Any                      # has `eval_batches(batch_size=, process_index=, process_count=)`
  use_mask: bool                 # pass a padding mask to the model (padded dialogue rows)
  per_byte: bool                 # report bits per character (byte-level text)
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


def make_task_data(config, model_cfg: ModelConfig, workdir: str | os.PathLike[str]) -> TaskData:
  """Builds the training and evaluation sources of `config.data.task`."""
  d = config.data
  if d.task == 'duplication':
    source = data.DuplicationSource(model_cfg.vocab_size, d.seq_len,
                                    eval_examples=d.eval_examples, eval_seed=d.seed + 1)
    return TaskData(train=source, eval=source, use_mask=False, per_byte=False)
  root = data.resolve_data_dir(d.data_dir or None)
  if d.task == 'text':
    text = data.load_text_bytes(root / d.text_file)
    splits = data.split_by_position(text, validation_fraction=d.validation_fraction)
    return TaskData(train=data.ByteTextSource(splits['train'], d.seq_len),
                    eval=data.ByteTextSource(splits['validation'], d.seq_len), use_mask=False,
                    per_byte=True, info={'train_bytes': len(splits['train']),
                                         'eval_bytes': len(splits['validation'])})
  if d.task == 'translation':
    corpus = root / d.corpus
    train_pairs = _limit(data.load_parallel(corpus, d.train_split, d.src_lang, d.tgt_lang),
                         d.max_train_pairs)
    eval_pairs = _limit(data.load_parallel(corpus, d.eval_split, d.src_lang, d.tgt_lang),
                        d.max_eval_pairs)
    tokenizer = _shared_tokenizer(workdir, model_cfg.vocab_size,
                                  lambda: (text for pair in train_pairs for text in pair))
    _check_tokenizer(tokenizer, model_cfg)
    build = functools.partial(data.TranslationExamples.build, tokenizer=tokenizer,
                              src_len=d.src_len, tgt_len=d.seq_len)
    train, evals = build(train_pairs), build(eval_pairs)
    if d.get('length_buckets'):
      train = train.with_widths(d.length_buckets)
    return TaskData(train=train, eval=evals, use_mask=False, per_byte=False,
                    info={'tokenizer_pieces': tokenizer.vocab_size,
                          **{f'train_{k}': v for k, v in train.stats.items()},
                          **{f'eval_{k}': v for k, v in evals.stats.items()}})
  # dialogue
  train_dialogues = _limit(data.load_dialogues(root / d.train_corpus, d.train_split or None),
                           d.max_train_dialogues)
  eval_dialogues = _limit(data.load_dialogues(root / d.eval_corpus, d.eval_split or None),
                          d.max_eval_dialogues)
  tokenizer = _shared_tokenizer(workdir, model_cfg.vocab_size,
                                lambda: data.iter_turn_segments(train_dialogues))
  _check_tokenizer(tokenizer, model_cfg)
  build = functools.partial(data.DialogueExamples.build, tokenizer=tokenizer, length=d.seq_len,
                            loss_on=d.loss_on, truncate=d.truncate)
  train, evals = build(train_dialogues), build(eval_dialogues)
  return TaskData(train=train, eval=evals, use_mask=True, per_byte=False,
                  info={'tokenizer_pieces': tokenizer.vocab_size,
                        **{f'train_{k}': v for k, v in train.stats.items()},
                        **{f'eval_{k}': v for k, v in evals.stats.items()}})


def _check_tokenizer(tokenizer, model_cfg: ModelConfig) -> None:
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f'{tokenizer.path} has {tokenizer.vocab_size} pieces but config.model.'
                     f'vocab_size={model_cfg.vocab_size}: raise vocab_size or delete the tokenizer')


def _limit(items: list, n: int) -> list:
  return items[:n] if n else items


# The tokenizer's files in a workdir, in the order they are uploaded to a bucket: the model last,
# so that a bucket never holds a model without the metadata that goes with it.
TOKENIZER_FILES = (data.tokenizer.META_FILENAME, data.tokenizer.TOKENIZER_FILENAME)


def _shared_tokenizer(workdir, vocab_size, texts):
  """Trains the tokenizer on process 0 (others wait, then load the saved file).

  sentencepiece reads local files only: for a bucket workdir the tokenizer lives in
  `storage.local_dir(workdir)`, downloaded from the bucket when it is there, uploaded after
  process 0 trained it.
  """
  workdir = storage.path(workdir)
  local = storage.local_dir(workdir)

  def load():
    found = [storage.download(workdir / name, local / name) for name in TOKENIZER_FILES]
    try:
      return data.load_or_train_tokenizer(local, vocab_size, texts), found[-1]
    except ValueError as e:
      if storage.is_remote(workdir):
        raise ValueError(f'{e} ({local} holds a copy of the tokenizer of {workdir}: delete the '
                         f'files {", ".join(TOKENIZER_FILES)} there instead.)') from e
      raise

  if jax.process_index() == 0:
    tokenizer, found = load()
    if storage.is_remote(workdir) and not found:
      for name in TOKENIZER_FILES:
        storage.upload(local / name, workdir / name)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer')
  if jax.process_index() != 0:
    tokenizer, _ = load()
  return tokenizer


# --------------------------------------------------------------------------- evaluation


def eval_variants(config, model_cfg: ModelConfig) -> dict[str, ModelConfig]:
  """Metric prefix -> model used for evaluation: 'eval' (as trained) plus `config.eval_n_hashes`
  and `config.eval_full_self`.

  `n > 0` turns every attention layer into LSH with n hashes ('eval_lsh{n}'); `0` into full
  attention ('eval_full'), both with the shared query/key rule that a token attends to itself
  only when nothing else is allowed; `eval_full_self` adds full attention in which it may
  ('eval_full_self'). Parameters are shared: all use the one shared query/key projection.
  """
  variants = {'eval': model_cfg}
  for n in config.eval_n_hashes:
    if n == 0:
      variants['eval_full'] = model_cfg.replace(attention_types=('full',), exclude_self=True)
    else:
      variants[f'eval_lsh{n}'] = model_cfg.replace(attention_types=('lsh',), n_hashes=n,
                                                   exclude_self=True)
  if config.eval_full_self:
    variants['eval_full_self'] = model_cfg.replace(attention_types=('full',), exclude_self=False)
  return variants


class Evaluator:
  """Runs every evaluation variant over the task's evaluation set; sums stay on device."""

  def __init__(self, config, model_cfg: ModelConfig, task: TaskData, mesh, root_key):
    self.config, self.task, self.mesh = config, task, mesh
    self.key = sharding.replicate(jax.random.fold_in(root_key, EVAL), mesh)
    rep = sharding.replicated(mesh)
    self.steps = {
        name: jax.jit(functools.partial(eval_step, model=make_model(cfg, config.data.task),
                                        use_mask=task.use_mask),
                      out_shardings=rep, compiler_options=compiler_options(config))
        for name, cfg in eval_variants(config, model_cfg).items()}

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    batches = self.task.eval.eval_batches(batch_size=self.config.eval_batch_size,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    return itertools.islice(batches, self.config.max_eval_batches or None)

  def __call__(self, params) -> dict[str, float]:
    totals = dict.fromkeys(self.steps)
    for i, local in enumerate(self.batches()):
      batch = sharding.global_batch(local, self.mesh)
      key = jax.random.fold_in(self.key, i)
      for name, step in self.steps.items():
        sums = step(params, batch, key)
        totals[name] = sums if totals[name] is None else jax.tree.map(jnp.add, totals[name], sums)
    metrics = {}
    for name, sums in jax.device_get(totals).items():
      if sums is None:
        raise ValueError('the evaluation set is empty: check config.data and max_eval_batches')
      metrics.update(summarize(sums, name, per_byte=self.task.per_byte))
    return metrics


def summarize(sums: dict[str, Any], prefix: str, *, per_byte: bool = False) -> dict[str, float]:
  """Token sums -> loss, accuracy and perplexity (or bits per character for byte-level text)."""
  weight = max(float(sums['weight']), 1.0)
  loss = float(sums['loss']) / weight
  out = {f'{prefix}/loss': loss, f'{prefix}/accuracy': float(sums['correct']) / weight}
  if per_byte:
    out[f'{prefix}/bits_per_char'] = loss / math.log(2)
  else:
    out[f'{prefix}/perplexity'] = math.exp(min(loss, 50.0))
  return out


# --------------------------------------------------------------------------- host-side metrics


class TrainLog:
  """Reads each step's metrics one step late, checks them, averages them and reports progress."""

  def __init__(self, writer: tracking.MetricWriter, *, start_step: int, total_steps: int,
               every: int, checkpointer: checkpointing.Checkpointer):
    self.writer, self.total, self.every = writer, total_steps, every
    self.checkpointer = checkpointer
    self.pending = None
    self.window: list[dict[str, Any]] = []
    self.window_start = time.perf_counter()
    self.run_start, self.start_step = self.window_start, start_step
    self.last: dict[str, float] = {}

  def push(self, step: int, metrics: dict[str, jax.Array], tokens: int) -> None:
    """Queues step `step`'s metrics (a batch of `tokens` target positions) and consumes the
    previous step's (now likely finished)."""
    metrics = {**metrics, 'tokens': tokens}
    previous, self.pending = self.pending, (step, metrics)
    if previous is not None:
      self._consume(*previous)

  def flush(self) -> None:
    """Consumes the queued metrics now (before a checkpoint, an evaluation or the end)."""
    if self.pending is not None:
      previous, self.pending = self.pending, None
      self._consume(*previous)

  def _consume(self, step: int, metrics: dict[str, jax.Array]) -> None:
    values = jax.device_get(metrics)
    bad = [k for k in ('loss', 'grad_norm', 'param_norm') if not np.isfinite(values[k])]
    if bad:
      latest = self.checkpointer.latest_step()
      where = ('no checkpoint was saved' if latest is None else
               f'the last good checkpoint, step {latest}, is intact in {self.checkpointer.directory}')
      raise NonFiniteError(
          f'non-finite {", ".join(bad)} at step {step} (loss {values["loss"]}, grad norm '
          f'{values["grad_norm"]}, parameter norm {values["param_norm"]}); training stopped and '
          f'{where}. Resume with a lower learning_rate, more warmup_steps, a grad_clip_norm, or '
          f'model.dtype=float32.')
    self.window.append(values)
    if step % self.every == 0 or step == self.total:
      self._write(step)

  def _write(self, step: int) -> None:
    now = time.perf_counter()
    n = len(self.window)
    rate = n / max(now - self.window_start, 1e-9)
    mean = lambda k: float(np.mean([v[k] for v in self.window]))
    loss = mean('loss')
    out = {'train/loss': loss, 'train/accuracy': mean('accuracy'),
           'train/perplexity': math.exp(min(loss, 50.0)),
           'train/learning_rate': mean('learning_rate'),
           'train/grad_norm': mean('grad_norm'), 'train/param_norm': mean('param_norm'),
           'perf/step_time_s': 1.0 / rate, 'perf/steps_per_s': rate,
           'perf/tokens_per_s': rate * mean('tokens')}
    balance = np.mean([v['bucket_balance'] for v in self.window], axis=0)
    out.update({f'lsh/bucket_balance_layer{i}': float(b) for i, b in enumerate(balance)})
    out.update(memory_usage())
    self.writer.write(step, out)
    self.last = out
    elapsed = now - self.run_start
    done = step - self.start_step
    eta = (self.total - step) * elapsed / max(done, 1)
    logging.info('step %d/%d (%.0f%%) | %.2f steps/s, %.0f tokens/s | loss %.4f, accuracy %.4f | '
                 'lr %.2e | elapsed %s, ETA %s', step, self.total, 100 * step / self.total, rate,
                 out['perf/tokens_per_s'], loss, out['train/accuracy'],
                 out['train/learning_rate'], _duration(elapsed), _duration(eta))
    self.window, self.window_start = [], now


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return f'{h}h{rest // 60:02d}m{rest % 60:02d}s' if h else f'{rest // 60}m{rest % 60:02d}s'


def memory_usage() -> dict[str, float]:
  """Host peak RSS and, where the backend reports it, the first local device's peak bytes."""
  out = {'memory/host_peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['memory/device_peak_bytes'] = stats['peak_bytes_in_use']
  return out


def compiled_memory(compiled) -> dict[str, int]:
  """Per-device sizes from XLA's memory analysis of a compiled program (empty if unavailable)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes')
  return {f'memory/compiled_{f.replace("_size_in_bytes", "")}_bytes': int(getattr(analysis, f))
          for f in fields if hasattr(analysis, f)}


# --------------------------------------------------------------------------- preemption


class PreemptionWatch:
  """Turns SIGTERM into a flag the loop checks between steps (one process), or asks JAX's
  preemption sync point, which picks the same step on every process (several processes)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after the current step.')
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.received
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      return False


# --------------------------------------------------------------------------- the loop


# XLA's CPU backend hands dots and their elementwise neighbours to YNNPACK as fused subgraphs,
# and a fused operand must be a full array: every feed-forward bias is first broadcast to
# `[tokens, d_ff]` in memory. Without these fusions the 6-layer, 4K-token step of
# experiments/peers.py ran about 5% faster at 14% less peak memory (0.65 vs 0.76 GiB).
CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.cache
def backend_options() -> dict[str, Any]:
  """XLA options of the training and evaluation steps on this backend: `CPU_OPTIONS` on CPU
  (unless XLA_FLAGS sets the same flag, or this jaxlib does not know it), none elsewhere."""
  if jax.default_backend() != 'cpu' or any(
      name in os.environ.get('XLA_FLAGS', '') for name in CPU_OPTIONS):
    return {}
  try:  # an option this XLA build does not have is an error at compile time
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(jnp.zeros(())).compile()
  except Exception:  # pylint: disable=broad-except
    logging.info('XLA does not take %s; compiling with its defaults.', CPU_OPTIONS)
    return {}
  return dict(CPU_OPTIONS)


def compiler_options(config) -> dict[str, Any] | None:
  """XLA options of every jitted function: `backend_options()`, and `config.fast_compile`
  lowers the backend optimization level, which roughly halves compile time on CPU at some cost
  in step time."""
  options = dict(backend_options())
  if config.fast_compile:
    options['xla_backend_optimization_level'] = 0
  return options or None


def init_params(model: ReformerLM | ReformerEncoderDecoder, seq_len: int, key: jax.Array,
                src_len: int | None = None):
  """Fresh parameters of `model`, traced on one row of `seq_len` tokens (and, for an
  encoder-decoder, a source row of `src_len`, default `seq_len`); under `jax.eval_shape`, their
  shapes: what a checkpoint is restored into."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  if isinstance(model, ReformerEncoderDecoder):
    src = jnp.zeros((1, src_len or seq_len), jnp.int32)
    return model.init({'params': key}, src, tokens, rng=key, train=False)['params']
  return model.init({'params': key}, tokens, rng=key, train=False)['params']


def create_train_state(model: ReformerLM, tx, config, mesh, key):
  """Abstract state and its shardings, then the real state built directly in place on devices."""
  def init(init_key):
    params = init_params(model, config.data.seq_len, init_key, config.data.get('src_len'))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, key)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings, lambda: jax.jit(init, out_shardings=shardings,
                                              compiler_options=compiler_options(config))(key)


def compile_train_step(model, tx, schedule, config, mesh, abstract_state, state_shardings,
                       use_mask: bool, widths: tuple[int, int] | None = None):
  """The jitted step (state donated), lowered and compiled for the global batch shape: rows of
  `data.seq_len` tokens (and sources of `data.src_len`), or `widths = (target, source)`."""
  step_fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                              grad_accum_steps=config.grad_accum_steps, use_mask=use_mask)
  rep = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sh, rep),
                   out_shardings=(state_shardings, rep), donate_argnums=(0,),
                   compiler_options=compiler_options(config))
  tgt_len, src_len = widths or (config.data.seq_len, config.data.get('src_len'))
  shape = (config.batch_size, tgt_len)
  batch = {'inputs': jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh),
           'weights': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sh)}
  if config.data.task == 'translation':
    batch['src'] = jax.ShapeDtypeStruct((config.batch_size, src_len), jnp.int32,
                                        sharding=batch_sh)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
  return jitted.lower(abstract_state, batch, key).compile()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest readable checkpoint.

  Returns the last logged training metrics and the final evaluation metrics, plus 'step' and
  'preempted' (True when SIGTERM stopped the run early, after saving a checkpoint).
  """
  model_cfg = validate_config(config)
  storage.check_workdir(workdir)
  workdir = storage.path(workdir)
  if not storage.is_remote(workdir):  # a bucket has no folders to make
    workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.num_devices)
  sharding.check_batch_size('batch_size', config.batch_size, mesh, config.grad_accum_steps)
  sharding.check_batch_size('eval_batch_size', config.eval_batch_size, mesh)
  checkpointing.save_config(config, workdir)
  logging.info('Devices: %d (%s), processes: %d; workdir %s', mesh.size,
               jax.devices()[0].platform, jax.process_count(), workdir)

  task = make_task_data(config, model_cfg, workdir)
  model = make_model(model_cfg, config.data.task)
  schedule = make_schedule(config)
  tx = make_optimizer(config, schedule)
  root_key = jax.random.PRNGKey(config.seed)
  abstract, shardings, init = create_train_state(
      model, tx, config, mesh, jax.random.fold_in(root_key, INIT))
  train_key = sharding.replicate(jax.random.fold_in(root_key, TRAIN), mesh)
  checkpointer = checkpointing.Checkpointer(
      workdir, max_to_keep=config.max_checkpoints_to_keep or None)
  writer = tracking.create_writer(config, workdir)
  try:
    state = checkpointer.restore_latest(abstract)
    if state is None:
      state = init()
      logging.info('Initialized a new model.')
    else:
      logging.info('Resumed from checkpoint step %d.', int(state.step))
    start, total = int(state.step), config.num_train_steps
    evaluator = Evaluator(config, model_cfg, task, mesh, root_key)
    if start >= total:
      logging.info('Nothing to train: step %d >= num_train_steps %d; evaluating.', start, total)
      eval_metrics = evaluator(state.params)
      writer.write(start, eval_metrics)
      _log_eval(start, eval_metrics)
      return {**eval_metrics, 'step': start, 'preempted': False}
    compile_step = functools.partial(compile_train_step, model, tx, schedule, config, mesh,
                                     abstract, shardings, task.use_mask)
    full_width = (config.data.seq_len, config.data.get('src_len'))
    compiled = {full_width: compile_step()}  # by (target, source) width; more with length_buckets
    memory = compiled_memory(compiled[full_width])
    num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    logging.info('%s parameters. Compiled train step, per device: %s', f'{num_params:,}',
                 ', '.join(f'{k[len("memory/compiled_"):-len("_bytes")]} {v / 2**20:.1f} MiB'
                           for k, v in memory.items()))
    writer.write_config(config.to_dict())
    writer.write(start, {**memory, 'num_params': num_params,
                         **{f'data/{k}': v for k, v in task.info.items()
                            if isinstance(v, (int, float))}})
    log = TrainLog(writer, start_step=start, total_steps=total, every=config.log_every_steps,
                   checkpointer=checkpointer)
    batches = data.make_batches(task.train, seed=config.data.seed,
                                global_batch_size=config.batch_size, start_step=start,
                                num_steps=max(total - start, 0),
                                process_index=jax.process_index(),
                                process_count=jax.process_count(), prefetch=config.data.prefetch)
    profiler = _Profiler(workdir, start + 2, config.profile_steps)
    eval_metrics, preempted = {}, False
    with PreemptionWatch() as watch:
      for step, local in zip(range(start + 1, total + 1), batches):
        batch = sharding.global_batch(local, mesh)
        width = (local['inputs'].shape[1], local['src'].shape[1] if 'src' in local else None)
        if width not in compiled:  # a length bucket's first batch
          compiled[width] = compile_step(width)
        profiler.before(step)
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          state, metrics = compiled[width](state, batch, train_key)
        profiler.after(step, state)
        log.push(step, metrics, tokens=config.batch_size * width[0])  # reads back the previous step's
        preempted = watch.reached(step)
        last = step == total
        evaluate = last or (config.eval_every_steps and step % config.eval_every_steps == 0)
        save = last or preempted or (config.checkpoint_every_steps
                                     and step % config.checkpoint_every_steps == 0)
        if evaluate or save:
          log.flush()  # checks this step's metrics before anything is written
        if save:
          checkpointer.save(step, state)
        if preempted:
          checkpointer.wait()
          logging.warning('Preempted: saved checkpoint %d in %s; rerun the same command to '
                          'resume.', step, checkpointer.directory)
          break
        if evaluate:
          eval_metrics = evaluator(state.params)
          writer.write(step, eval_metrics)
          _log_eval(step, eval_metrics)
    log.flush()
  finally:
    checkpointer.close()  # waits for in-flight saves; never starts one
    writer.close()

  result = {**log.last, **eval_metrics, 'step': int(state.step), 'preempted': preempted}
  logging.info('Final metrics at step %d: %s', result['step'], ', '.join(
      f'{k} {v:.4f}' for k, v in sorted(result.items())
      if k.startswith(('train/loss', 'train/accuracy', 'eval')) and isinstance(v, float)))
  return result


def _log_eval(step: int, metrics: dict[str, float]) -> None:
  logging.info('eval at step %d: %s', step, ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))


class _Profiler:
  """Traces `profile_steps` steps from `first` into `<workdir>/profile` (TensorBoard/Perfetto);
  for a bucket workdir into a local temporary folder, uploaded when the trace stops."""

  def __init__(self, workdir, first: int, num_steps: int):
    self.dir = storage.path(workdir) / 'profile'
    self.remote = storage.is_remote(self.dir)
    self.first, self.last = first, first + num_steps - 1
    self.on = num_steps > 0 and jax.process_index() == 0
    self.trace_dir = None

  def before(self, step: int):
    if self.on and step == self.first:
      self.trace_dir = tempfile.mkdtemp(prefix='reformer_profile_') if self.remote else self.dir
      jax.profiler.start_trace(str(self.trace_dir))

  def after(self, step: int, state):
    if self.on and step == self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      if self.remote:
        storage.upload_tree(self.trace_dir, self.dir)
        shutil.rmtree(self.trace_dir, ignore_errors=True)
      logging.info('Wrote a profile of steps %d-%d to %s.', self.first, self.last, self.dir)
