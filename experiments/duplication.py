"""The paper's duplication task (Table 2): train with full attention and LSH-1/2/4, evaluate each
model with full attention and with 1, 2, 4 and 8 hashes; and the same with `full_self`
attention, full attention in which a token may attend to its own shared query/key.

    python -m experiments.duplication                    # CPU scale: length 256 (|w| = 127)
    python -m experiments.duplication --length 1024      # the paper's setting, for an accelerator

Each training run is `configs/duplication.py:<attention>` (one layer, d_model = d_ff = 256,
4 heads, sequences `0 w 0 w` over 127 symbols, accuracy on the second copy of w) with the
length, chunk length and budget set from the flags; it lives in `<workdir>/<attention>` and
resumes from its checkpoint if interrupted, so rerunning the command continues where it stopped
(finished runs only re-evaluate). Every run evaluates with `eval_n_hashes = (1, 2, 4, 8, 0)`
and `eval_full_self` on the same fixed evaluation set.

`full` is the Reformer's shared-QK full attention: a token attends to its own key only when no
other key is allowed, the rule LSH attention follows (a token's own key would otherwise win
almost every query). `full_self` drops that rule, as plain attention applied to a shared
query/key does: the row trains with it, the column evaluates with it.

The paper uses chunks of 64 at length 1024 (16 chunks); at a smaller length the chunk length
keeps that ratio (`--chunk-len`, default length / 16).

Writes `--out` (JSON), a Markdown table (`.md`) and a heatmap (`.png`) next to it, rows = training attention,
columns = evaluation attention, cells = accuracy on the second copy:

    {"machine": {...}, "config": {...},
     "rows": [{"train": "lsh4", "step": ..., "train_s": ..., "eval": {"full": acc,
               "full_self": acc, "lsh1": acc, "lsh2": acc, "lsh4": acc, "lsh8": acc}}, ...]}
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Sequence

from experiments import common
from reformer_jax import host_memory

DEFAULT_OUT = common.REPO_ROOT / 'experiments' / 'results' / 'duplication_cpu.json'
TRAIN = ('full', 'full_self', 'lsh1', 'lsh2', 'lsh4')
EVAL = {'full': 'eval_full', 'full_self': 'eval_full_self', 'lsh1': 'eval_lsh1',
        'lsh2': 'eval_lsh2', 'lsh4': 'eval_lsh4', 'lsh8': 'eval_lsh8'}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--train', nargs='+', default=list(TRAIN), choices=TRAIN,
                 help='training attentions (rows of the table)')
  p.add_argument('--length', type=int, default=256,
                 help='sequence length 2 |w| + 2 (the paper: 1024)')
  p.add_argument('--chunk-len', type=int, default=0, help='LSH chunk length; 0: length / 16')
  p.add_argument('--steps', type=int, default=1500, help='training steps per run')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--learning-rate', type=float, default=1e-3)
  p.add_argument('--eval-examples', type=int, default=512)
  p.add_argument('--d-model', type=int, default=256, help='d_model = d_ff (the paper: 256)')
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--fast-compile', action='store_true',
                 help='XLA optimization level 0 (compiles faster, runs slower: smoke tests)')
  p.add_argument('--workdir', default='workdir/duplication',
                 help='one subdirectory per training attention; reruns resume')
  p.add_argument('--out', default=str(DEFAULT_OUT))
  common.add_wandb_flag(p, 'the training runs and the table')
  args = p.parse_args(argv)
  if args.length < 8 or args.length % 2:
    p.error(f'--length must be even and >= 8 (0 w 0 w), got {args.length}')
  args.chunk_len = args.chunk_len or max(args.length // 16, 4)
  if args.length % args.chunk_len:
    p.error(f'--chunk-len {args.chunk_len} must divide --length {args.length}')
  if args.steps < 1:
    p.error('--steps must be >= 1')
  return args


def run_config(args: argparse.Namespace, attention: str):
  """`configs/duplication.py:<attention>` at the flags' length and budget."""
  from configs import duplication  # pylint: disable=import-outside-toplevel
  config = duplication.get_config(attention)
  config.data.seq_len = args.length
  config.data.eval_examples = args.eval_examples
  config.model.max_len = args.length
  config.model.chunk_len = args.chunk_len
  config.model.axial_shape = None             # (unused with learned positions)
  config.model.d_model = config.model.d_ff = args.d_model
  config.model.n_heads = args.heads
  config.batch_size = args.batch
  config.eval_batch_size = min(64, args.eval_examples)
  config.num_train_steps = args.steps
  config.learning_rate = args.learning_rate
  config.warmup_steps = min(config.warmup_steps, max(args.steps // 10, 1))
  config.eval_every_steps = 0                  # the table needs only the final evaluation
  config.checkpoint_every_steps = max(args.steps // 5, 1)
  config.log_every_steps = max(args.steps // 20, 1)
  config.fast_compile = args.fast_compile
  config.wandb.mode = args.wandb
  config.wandb.tags = ('duplication', attention, f'length{args.length}')
  return config


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The paper's layout: one row per training attention, one column per evaluation attention."""
  table = [{'train \\ eval': r['train'], **{k: f"{100 * v:.1f}%" for k, v in r['eval'].items()}}
           for r in rows]
  return common.markdown_table(table, ['train \\ eval', *EVAL])


def plot(rows: Sequence[dict[str, Any]], title: str, path: pathlib.Path) -> pathlib.Path:
  """The table as a heatmap: accuracy by training (rows) and evaluation attention (columns)."""
  plt = common.pyplot()
  values = [[r['eval'][name] for name in EVAL] for r in rows]
  fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.55 * len(rows)))
  ax.imshow(values, vmin=0.0, vmax=1.0, cmap='viridis', aspect='auto')
  ax.set_xticks(range(len(EVAL)), [f'eval {name}' for name in EVAL])
  ax.set_yticks(range(len(rows)), [f"train {r['train']}" for r in rows])
  for i, row in enumerate(values):
    for j, v in enumerate(row):
      ax.text(j, i, f'{100 * v:.1f}', ha='center', va='center',
              color='black' if v > 0.6 else 'white', fontsize=9)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  host_memory.keep_freed_memory()  # before the first computation
  from reformer_jax import train  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(args.workdir)
  rows = []
  for i, attention in enumerate(args.train):
    print(f'[{i + 1}/{len(args.train)}] training {attention} at length {args.length} '
          f'({args.steps} steps) in {workdir / attention}', file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = train.train_and_evaluate(run_config(args, attention), str(workdir / attention))
    if result.get('preempted'):
      raise SystemExit(f'{attention}: interrupted at step {result["step"]}; rerun the same '
                       f'command to resume.')
    rows.append({'train': attention, 'step': result['step'],
                 'train_s': round(time.perf_counter() - start, 1),
                 'eval': {name: result[f'{prefix}/accuracy'] for name, prefix in EVAL.items()}})
  config = {k: v for k, v in vars(args).items() if k not in ('out', 'workdir', 'wandb', 'fast_compile')}
  config['w_length'] = args.length // 2 - 1
  result = {'machine': common.machine_info(), 'config': config, 'rows': rows}
  out = common.write_json(args.out, result)
  table = markdown(rows)
  title = (f"Duplication, length {args.length} (|w| = {config['w_length']}), chunk "
           f"{args.chunk_len}, {args.steps} steps of batch {args.batch}")
  out.with_suffix('.md').write_text(
      f"{title}; accuracy on the second copy ({common.machine_title(result['machine'])}).\n\n"
      f"{table}\n", encoding='utf-8')
  png = plot(rows, title, out.with_suffix('.png'))
  print(table)
  print(f"wrote {out}, {out.with_suffix('.md')} and {png}")
  common.log_to_wandb(
      args.wandb, job='duplication', config=config,
      rows=[{'train': r['train'], **r['eval']} for r in rows], columns=['train', *EVAL],
      images={'table': png},
      summary={f"{r['train']}_eval_{name}": v for r in rows for name, v in r['eval'].items()})
  return result


if __name__ == '__main__':
  main()
