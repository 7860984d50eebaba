"""Training runs side by side: their evaluation curves (from each workdir's `metrics.jsonl`) and,
optionally, their `reformer_jax.evaluate` results, as one JSON file and a plot.

    python -m experiments.training_curves \\
        --run reversible/seed0=workdir/translation_rev --run standard/seed0=workdir/translation_std \\
        --eval reversible/seed0=experiments/results/translation_reversible_seed0_test2016.json \\
        --eval standard/seed0=experiments/results/translation_standard_seed0_test2016.json \\
        --out experiments/results/translation_curves.json

`--run NAME=PATH` takes a workdir or a `metrics.jsonl` file; `--eval NAME=FILE` adds that run's
test result (step, perplexity, BLEU, ROUGE-L) to the table and the legend. Runs named
`GROUP/LABEL` (several seeds of one setting: `--run reversible/seed0=... --run
reversible/seed1=...`) are also summarized per group: the mean and sample standard deviation of
their best value of the metric and of their test BLEU (one colour per group in the plot).

Writes JSON:
    {"machine": {...} | null, "command": str, "metric": str,
     "runs": {NAME: {"source", "steps": [...], METRIC: [...], "best_step", "best", "final_step",
                     "train_steps": [...], "train/loss": [...], "test": {...} | null}},
     "groups": {GROUP: {"runs": [NAME, ...], "n", "best_mean", "best_std", "bleu_mean",
                        "bleu_std", "bleu_n"}}}   (std: null for one run; bleu_*: runs with a test)
and a PNG next to it. `machine` is the machine named by the first `--eval` file (the machine
the evaluation ran on), else null: metrics.jsonl does not record it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Sequence

from experiments import common

TEST_FIELDS = ('step', 'split', 'strategy', 'n_pairs', 'perplexity', 'bleu', 'rouge_l')


def _named(values: Sequence[str], flag: str) -> dict[str, pathlib.Path]:
  out = {}
  for value in values:
    name, sep, path = value.partition('=')
    if not sep or not name or not path:
      raise SystemExit(f'{flag} {value!r}: use {flag} NAME=PATH')
    out[name] = pathlib.Path(path)
  return out


def read_curves(path: pathlib.Path, metric: str) -> dict[str, Any]:
  """Eval and train-loss curves of one run (`path`: a workdir or its metrics.jsonl)."""
  file = path / 'metrics.jsonl' if path.is_dir() else path
  if not file.is_file():
    raise SystemExit(f'{path}: no metrics.jsonl (pass a training workdir or the file itself)')
  evals, train = {}, {}
  for n, line in enumerate(file.read_text(encoding='utf-8').splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as err:
      raise SystemExit(f'{file}:{n}: not JSON ({err})') from None
    step = record.get('step')
    if step is None:
      continue
    if metric in record:   # a resumed run may log a step twice: the later line wins
      evals[int(step)] = float(record[metric])
    if 'train/loss' in record:
      train[int(step)] = float(record['train/loss'])
  if not evals:
    raise SystemExit(f'{file}: no {metric!r} values (was the run evaluated? config.eval_every_steps)')
  steps = sorted(evals)
  best = min(steps, key=evals.get) if 'perplexity' in metric or 'loss' in metric else max(
      steps, key=evals.get)
  return {'source': str(path), 'steps': steps, metric: [evals[s] for s in steps],
          'best_step': best, 'best': evals[best], 'final_step': steps[-1],
          'train_steps': sorted(train), 'train/loss': [train[s] for s in sorted(train)]}


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  if not values:
    return None, None
  mean = sum(values) / len(values)
  if len(values) == 1:
    return mean, None
  return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def summarize_groups(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per `GROUP` of the runs named `GROUP/LABEL`: mean and sample std of their best metric
  value and of their test BLEU. Runs without a '/' form no group."""
  groups: dict[str, list[str]] = {}
  for name in runs:
    group, sep, label = name.partition('/')
    if sep and group and label:
      groups.setdefault(group, []).append(name)
  out = {}
  for group, names in groups.items():
    best_mean, best_std = _mean_std([runs[n]['best'] for n in names])
    bleus = [runs[n]['test']['bleu'] for n in names
             if runs[n].get('test') and runs[n]['test'].get('bleu') is not None]
    bleu_mean, bleu_std = _mean_std(bleus)
    out[group] = {'runs': names, 'n': len(names), 'best_mean': best_mean, 'best_std': best_std,
                  'bleu_mean': bleu_mean, 'bleu_std': bleu_std, 'bleu_n': len(bleus)}
  return out


def plot(result: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  plt = common.pyplot()
  metric = result['metric']
  fig, (ax, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
  colours = {}  # a run of a group takes the group's colour
  for name, run in result['runs'].items():
    test = run.get('test')
    label = name + (f" (test BLEU {test['bleu']:.1f} at step {test['step']:,})"
                    if test and test.get('bleu') is not None else '')
    group = name.partition('/')[0]  # the whole name when it has no '/'
    style = {'color': colours[group]} if group in colours else {}
    line, = ax.plot(run['steps'], run[metric], marker='o', ms=3, label=label, **style)
    colours.setdefault(group, line.get_color())
    ax.plot([run['best_step']], [run['best']], marker='*', ms=12, color=line.get_color())
    ax_train.plot(run['train_steps'], run['train/loss'], color=line.get_color(), label=name)
  ax.set_xlabel('step')
  ax.set_ylabel(metric + ' (star: best)')
  ax.set_title(f'{metric} during training')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  ax_train.set_xlabel('step')
  ax_train.set_ylabel('train/loss')
  ax_train.set_yscale('log')
  ax_train.set_title('training loss')
  ax_train.legend(fontsize=8)
  ax_train.grid(alpha=0.3)
  machine = result.get('machine')
  if machine:
    fig.suptitle(common.machine_title(machine), fontsize=9)
  fig.tight_layout()
  png = path.with_suffix('.png')
  fig.savefig(png, dpi=120)
  plt.close(fig)
  return png


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--run', action='append', required=True, metavar='NAME=PATH',
                 help='a training workdir (or its metrics.jsonl); repeat for each run')
  p.add_argument('--eval', action='append', default=[], metavar='NAME=FILE',
                 help="a reformer_jax.evaluate JSON of run NAME (its test result)")
  p.add_argument('--metric', default='eval/perplexity', help='the curve to compare')
  p.add_argument('--out', type=pathlib.Path, required=True, help='JSON file; the plot goes next to it')
  args = p.parse_args(argv)
  runs = {name: read_curves(path, args.metric) for name, path in _named(args.run, '--run').items()}
  machine = None
  for name, file in _named(args.eval, '--eval').items():
    if name not in runs:
      raise SystemExit(f'--eval {name}=...: no --run named {name!r} (runs: {", ".join(runs)})')
    evaluation = json.loads(file.read_text(encoding='utf-8'))
    runs[name]['test'] = {k: evaluation.get(k) for k in TEST_FIELDS}
    machine = machine or evaluation.get('machine')
  for run in runs.values():
    run.setdefault('test', None)
  result = {'machine': machine, 'command': common.command_line('experiments.training_curves', argv),
            'metric': args.metric, 'runs': runs, 'groups': summarize_groups(runs)}
  common.write_json(args.out, result)
  png = plot(result, args.out)
  rows = [{'run': name, 'final step': r['final_step'], f'final {args.metric}': r[args.metric][-1],
           'best step': r['best_step'], f'best {args.metric}': r['best'],
           'test step': (r['test'] or {}).get('step'), 'test BLEU': (r['test'] or {}).get('bleu')}
          for name, r in runs.items()]
  print(common.markdown_table(rows, list(rows[0])))
  if result['groups']:
    fmt = lambda m, sd: '-' if m is None else f'{m:.3f}' + ('' if sd is None else f' ± {sd:.3f}')
    print(common.markdown_table(
        [{'group': g, 'runs': v['n'], f'best {args.metric}': fmt(v['best_mean'], v['best_std']),
          'test BLEU': fmt(v['bleu_mean'], v['bleu_std'])} for g, v in result['groups'].items()],
        ['group', 'runs', f'best {args.metric}', 'test BLEU']))
  print(f'wrote {args.out} and {png}')
  return result


if __name__ == '__main__':
  main(sys.argv[1:])
