"""Evaluate a trained model from its workdir; prints one JSON object on stdout, logs on stderr.

    python -m reformer_jax.evaluate --workdir=workdir/chatbot --data=../shared/data/multiwoz \\
        --split=validation --max_dialogues=200
    python -m reformer_jax.evaluate --workdir=workdir/chatbot --data=../shared/data/sgd \\
        --split=test --strategy=beam --beam=4
    python -m reformer_jax.evaluate --workdir=workdir/chatbot   # the run's own evaluation set

`--data` is a dialogue file or folder (MultiWOZ 2.1 `data.json` style, MultiWOZ 2.2, SGD,
CamRest676: whatever `data.load_dialogues` reads, with `--split` for dataset folders); a
relative path that does not exist is looked up under the shared data folder
(`data.resolve_data_dir`). Without `--data`, the run's `data.eval_corpus` and `data.eval_split`.

    python -m reformer_jax.evaluate --task=translation --workdir=workdir/translation_rev \
        --split=test --strategy=beam --beam=4

Task `dialogue` (`--task`; TASKS maps each name to its function):

* perplexity, teacher-forced over the rows training builds from these dialogues (same tokenizer,
  row length and newest-turns truncation, `train.eval_step`): on every token (`perplexity`, as
  training's `eval/perplexity`) and on Person 2's tokens only (`reply_perplexity`);
* generation: for every Person 2 turn, a reply from the gold history before it (its newest turns
  when long, `inference.reply_prompts`), decoded in batches (`--batch_size`, prompts sorted by
  length) with `--strategy`; corpus BLEU (sacreBLEU, its default 13a tokenization) and ROUGE-L
  F-measure (rouge-score, averaged over replies) against the gold turn.

Task `translation` (an encoder-decoder run of `configs/translation.py`): `--data` is the parallel
corpus folder (default: the run's `data.corpus`), `--split` a Multi30k split (default `test`,
i.e. `test_2016_flickr`), `--max_pairs` the first N sentence pairs. Reports teacher-forced
`perplexity` over the target tokens (EOS included) and corpus sacreBLEU / ROUGE-L of the
translations (`decode.translate`: `--strategy=beam` with `--beam` and `--alpha`, or `greedy`,
at most the run's target length) against the raw reference sentences; fields task, workdir,
step, data, split, strategy, decode, n_pairs, n_tokens, perplexity, loss, accuracy, bleu,
bleu_signature, rouge_l, generation_seconds, sentences_per_second, samples.

Dialogue output fields: task, workdir, step, data, split, strategy, decode (all decoding options),
n_dialogues, n_replies, n_tokens (scored tokens), n_reply_tokens, perplexity, loss, accuracy,
reply_perplexity, bleu, bleu_signature, rouge_l, generation_seconds, replies_per_second, samples
(the first `--num_samples` replies: dialogue id, turn, prompt, reference, generated).

`--wandb auto|offline|online` also writes the scores into the training run's W&B run (resumed
by the workdir's `wandb_run_id`) as summary fields `<split>/<field>` (`test/bleu`,
`test/perplexity`, `test/step`, ...), so the W&B runs table compares runs by their test scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from reformer_jax import (checkpointing, data, decode, host_memory, inference, machine, tracking,
                          train)
from reformer_jax.data.dialogues import Dialogue
from reformer_jax.models import ReformerLM


# --------------------------------------------------------------------------- metrics


def perplexity(model: inference.DialogueModel, dialogues: Sequence[Dialogue],
               batch_size: int) -> dict[str, float]:
  """Teacher-forced loss, accuracy and perplexity over all tokens and over Person 2's tokens."""
  examples = data.DialogueExamples.build(dialogues, model.tokenizer, model.seq_len,
                                         loss_on='all', truncate='turns')
  totals = None
  for every, replies in zip(examples.eval_batches(batch_size=batch_size),
                            examples.with_loss_on('replies').eval_batches(batch_size=batch_size)):
    sums = _token_sums(model.params, every['inputs'], every['weights'], replies['weights'],
                       cfg=model.cfg)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  every, replies = train.summarize(totals['all'], 'all'), train.summarize(totals['replies'], 'r')
  return {'perplexity': every['all/perplexity'], 'loss': every['all/loss'],
          'accuracy': every['all/accuracy'], 'reply_perplexity': replies['r/perplexity'],
          'n_tokens': int(totals['all']['weight']),
          'n_reply_tokens': int(totals['replies']['weight']),
          'n_rows': len(examples), 'n_dropped': examples.stats['dropped']}


@functools.partial(jax.jit, static_argnames='cfg')
def _token_sums(params, inputs, weights, reply_weights, *, cfg):
  """Training's evaluation sums for both weightings (one forward pass after XLA's CSE). No key:
  the model's `hash_seed` fixes the LSH rotations."""
  lm = ReformerLM(cfg)
  return {name: train.eval_step(params, {'inputs': inputs, 'weights': w}, None, model=lm,
                                use_mask=True)
          for name, w in (('all', weights), ('replies', reply_weights))}


def text_scores(generated: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
  """Corpus BLEU (sacreBLEU) and mean ROUGE-L F-measure (rouge-score), both 0-100."""
  import sacrebleu  # pylint: disable=import-outside-toplevel
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel

  bleu = sacrebleu.metrics.BLEU()
  score = bleu.corpus_score(list(generated), [list(references)])
  scorer = rouge_scorer.RougeScorer(['rougeL'])
  rouge = [scorer.score(ref, hyp)['rougeL'].fmeasure for ref, hyp in zip(references, generated)]
  return {'bleu': score.score, 'bleu_signature': str(bleu.get_signature()),
          'rouge_l': 100 * float(np.mean(rouge)) if rouge else 0.0}


# --------------------------------------------------------------------------- generation


class Progress:
  """Done / total with rate and ETA on stderr: a rich bar on a terminal, else a log line per
  update (log files stay readable)."""

  def __init__(self, total: int, what: str):
    self.total, self.what, self.done = total, what, 0
    self.start = time.perf_counter()
    self.bar = None
    if sys.stderr.isatty():
      from rich import console, progress  # pylint: disable=import-outside-toplevel
      self.bar = progress.Progress(*progress.Progress.get_default_columns(),
                                   progress.TimeElapsedColumn(),
                                   console=console.Console(stderr=True), transient=True)
      self.task = self.bar.add_task(what, total=total)
      self.bar.start()

  def advance(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.advance(self.task, n)
      return
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.done * (self.total - self.done)
    logging.info('%s: %d/%d (%.0f%%), %.1f/s, elapsed %.0fs, ETA %.0fs', self.what, self.done,
                 self.total, 100 * self.done / self.total, self.done / elapsed, elapsed, eta)

  def close(self) -> float:
    """Stops the bar; returns the seconds since the start."""
    if self.bar is not None:
      self.bar.stop()
    return time.perf_counter() - self.start


def generate_all(model: inference.DialogueModel, prompts: Sequence[inference.Prompt],
                 options: inference.DecodeOptions, batch_size: int,
                 on_batch: Callable[[int], None] = lambda n: None) -> list[str]:
  """Replies to every prompt, in order: batches of similar lengths, each padded to `batch_size`
  rows so that they share compilations; the PRNG key of batch b is `fold_in(seed, b)`."""
  order = np.argsort([len(p.ids) for p in prompts], kind='stable')
  key = jax.random.PRNGKey(options.seed)
  replies: list[str] = [''] * len(prompts)
  for b, start in enumerate(range(0, len(order), batch_size)):
    batch = order[start:start + batch_size]
    out = inference.generate_replies(model, [prompts[i].ids for i in batch], options,
                                     jax.random.fold_in(key, b), rows=batch_size)
    for i, reply in zip(batch, out):
      replies[i] = reply
    on_batch(len(batch))
  return replies


# --------------------------------------------------------------------------- tasks


def evaluate_dialogue(args: argparse.Namespace,
                      options: inference.DecodeOptions) -> dict[str, Any]:
  """Perplexity and reply generation on `--data` (see the module docstring)."""
  model = inference.load_model(args.workdir, step=args.step, hash_seed=args.hash_seed)
  options.validate(model)
  logging.info('Loaded step %d of %s (%s parameters).', model.step, args.workdir,
               f'{sum(x.size for x in jax.tree.leaves(model.params)):,}')
  dialogues = load_data(args, model)
  logging.info('%d dialogues from %s%s.', len(dialogues), args.data,
               f' [{args.split}]' if args.split else '')
  ppl = perplexity(model, dialogues, args.batch_size)
  logging.info('Perplexity %.3f over %d tokens (replies: %.3f).', ppl['perplexity'],
               ppl['n_tokens'], ppl['reply_perplexity'])
  items = [(d, p) for d in dialogues
           for p in inference.reply_prompts(d, model.tokenizer, model.prompt_len(options))]
  progress = Progress(len(items), f'replies ({options.strategy})')
  try:
    generated = generate_all(model, [p for _, p in items], options, args.batch_size,
                             progress.advance)
  finally:
    seconds = progress.close()
  references = [d.turns[p.turn][1] for d, p in items]
  samples = [{'dialogue_id': d.id, 'turn': p.turn, 'prompt': model.tokenizer.decode(p.ids),
              'reference': ref, 'generated': gen}
             for (d, p), ref, gen in list(zip(items, references, generated))[:args.num_samples]]
  return {'step': model.step, 'hash_seed': model.cfg.hash_seed, 'n_dialogues': len(dialogues),
          'n_replies': len(items), **ppl,
          **text_scores(generated, references), 'generation_seconds': round(seconds, 3),
          'replies_per_second': len(items) / max(seconds, 1e-9), 'samples': samples}


def evaluate_translation(args: argparse.Namespace,
                         options: inference.DecodeOptions) -> dict[str, Any]:
  """Perplexity and beam-search (or greedy) sacreBLEU of a translation run on `--data`."""
  if options.strategy not in ('beam', 'greedy'):
    raise ValueError(f'--strategy={options.strategy}: translation decodes with beam or greedy')
  model = inference.load_model(args.workdir, step=args.step, task='translation')
  config = checkpointing.load_config_dict(model.workdir)['data']
  if args.data is None:
    args.data = str(data.resolve_data_dir(config['data_dir'] or None) / config['corpus'])
  path = _data_path(args.data)
  args.data, args.split = str(path), args.split or 'test'
  pairs = data.load_parallel(path, args.split, config['src_lang'], config['tgt_lang'])
  pairs = pairs[:args.max_pairs] if args.max_pairs else pairs
  logging.info('Loaded step %d of %s; %d %s-%s pairs from %s [%s].', model.step, args.workdir,
               len(pairs), config['src_lang'], config['tgt_lang'], args.data, args.split)
  examples = data.TranslationExamples.build(pairs, model.tokenizer, src_len=model.src_len,
                                            tgt_len=model.seq_len)
  step = jax.jit(functools.partial(train.eval_step, model=train.make_model(model.cfg,
                                                                            'translation')))
  totals = None
  for batch in examples.eval_batches(batch_size=args.batch_size):
    sums = step(model.params, batch, None)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  ppl = train.summarize(jax.device_get(totals), 't')
  beam = options.beam if options.strategy == 'beam' else 1
  progress = Progress(len(pairs), f'translations ({options.strategy})')
  generated: list[str] = []
  try:
    for start in range(0, len(pairs), args.batch_size):
      src = examples.src[start:start + args.batch_size]
      rows = len(src)
      src = np.concatenate([src, np.zeros((args.batch_size - rows, src.shape[1]), src.dtype)])
      (tokens, _), _ = decode.translate(model.cfg, model.params, src, beam_size=beam,
                                        max_len=model.seq_len, alpha=options.alpha)
      generated += [model.tokenizer.decode(row) for row in np.asarray(tokens)[:rows]]
      progress.advance(rows)
  finally:
    seconds = progress.close()
  samples = [{'source': src, 'reference': ref, 'generated': gen}
             for src, ref, gen in zip(examples.sources, examples.references,
                                      generated)][:args.num_samples]
  return {'step': model.step, 'n_pairs': len(pairs), 'n_tokens': int(totals['weight']),
          'perplexity': ppl['t/perplexity'], 'loss': ppl['t/loss'], 'accuracy': ppl['t/accuracy'],
          **text_scores(generated, examples.references), 'generation_seconds': round(seconds, 3),
          'sentences_per_second': len(pairs) / max(seconds, 1e-9), 'samples': samples}


# --task name -> function(flags, decoding options) -> result fields, 'step' (checkpoint) included.
# Each task loads its own model.
TASKS: dict[str, Callable[[argparse.Namespace, inference.DecodeOptions], dict[str, Any]]] = {
    'dialogue': evaluate_dialogue, 'translation': evaluate_translation}


def _data_path(text: str) -> pathlib.Path:
  """`--data` as given, or, when that relative path does not exist, under the shared data folder."""
  path = pathlib.Path(text)
  if not path.exists() and not path.is_absolute():
    path = data.resolve_data_dir() / path
  return path


def load_data(args: argparse.Namespace, model: inference.DialogueModel) -> list[Dialogue]:
  """The first `--max_dialogues` dialogues of `--data` (default: the run's evaluation corpus)."""
  if args.data is None:
    config = checkpointing.load_config_dict(model.workdir)['data']
    args.data = str(data.resolve_data_dir(config['data_dir'] or None) / config['eval_corpus'])
    args.split = args.split or config['eval_split'] or None
  path = _data_path(args.data)
  args.data = str(path)
  dialogues = data.load_dialogues(path, args.split or None)
  return dialogues[:args.max_dialogues] if args.max_dialogues else dialogues


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m reformer_jax.evaluate',
                                   description='Evaluate a trained model; one JSON object on '
                                               'stdout.')
  inference.add_model_flags(parser)
  parser.add_argument('--task', default='dialogue', choices=sorted(TASKS),
                      help='what to evaluate (default dialogue)')
  parser.add_argument('--data', default=None,
                      help="dialogue file or folder; default: the run's data.eval_corpus")
  parser.add_argument('--split', default=None,
                      help='train, validation (val, dev) or test, for dataset folders')
  parser.add_argument('--max_dialogues', type=int, default=0,
                      help='evaluate the first N dialogues; 0: all (default)')
  parser.add_argument('--max_pairs', type=int, default=0,
                      help='translation: evaluate the first N sentence pairs; 0: all (default)')
  parser.add_argument('--batch_size', type=int, default=16,
                      help='rows per scoring and generation batch (default 16)')
  parser.add_argument('--num_samples', type=int, default=3,
                      help='generated replies to include in the output (default 3)')
  parser.add_argument('--wandb', default='disabled', choices=tracking.WANDB_MODES,
                      help="also put the scores in the training run's W&B run summary, as "
                           "'<split>/<field>' (auto: online with an API key, else offline; "
                           'default disabled)')
  inference.add_decode_flags(parser)
  return parser.parse_args(argv)


def summary_fields(result: dict[str, Any]) -> dict[str, Any]:
  """The result's scores as W&B summary fields: `<split>/<field>` for every finite number, the
  checkpoint step and the decoding strategy."""
  prefix = result.get('split') or 'eval'
  fields = {f'{prefix}/{k}': v for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
  return {**fields, f'{prefix}/strategy': result['strategy']}


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Evaluates as the flags say; returns the result object.

  Raises:
    inference.ModelLoadError: the workdir holds no usable model.
    ValueError, FileNotFoundError: bad flags or data, with the fix in the message.
  """
  if args.batch_size < 1 or min(args.max_dialogues, args.max_pairs, args.num_samples) < 0:
    raise ValueError(f'--batch_size={args.batch_size}, --max_dialogues={args.max_dialogues}, '
                     f'--num_samples={args.num_samples}: use batch_size >= 1, the others >= 0')
  options = inference.DecodeOptions.from_args(args)
  result = TASKS[args.task](args, options)
  return {'task': args.task, 'workdir': args.workdir, 'step': result.pop('step'),
          'machine': machine.machine_info(),
          'data': args.data, 'split': args.split, 'strategy': options.strategy,
          'decode': dataclasses.asdict(options), **result}


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  host_memory.keep_freed_memory()  # before the first computation
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S',
                      force=True)  # some imported library already configured the root logger
  for name in ('absl', 'jax'):  # Orbax's per-restore lines, JAX's backend probing
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    result = run(args)
  except (inference.ModelLoadError, ValueError, FileNotFoundError) as e:
    print(f'evaluate: {e}', file=sys.stderr)
    return 1
  if args.wandb != 'disabled':
    config = checkpointing.load_config_dict(args.workdir).get('wandb', {})
    mode = tracking.log_evaluation(args.workdir, config, summary_fields(result), mode=args.wandb)
    logging.info('Scores added to the W&B run summary of %s (%s).', args.workdir, mode)
  summary = {k: v for k, v in result.items() if isinstance(v, float)}
  logging.info('%s', ', '.join(f'{k} {v:.4g}' for k, v in summary.items()
                               if math.isfinite(v)))
  print(json.dumps(result, ensure_ascii=False), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
