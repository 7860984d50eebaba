"""reformer_jax against the PyTorch Reformers: one training step's tokens/s and peak memory.

    python -m venv --system-site-packages .venv-peers
    .venv-peers/bin/pip install -e '.[peers]'     # torch==2.13.0 (the CPU build), transformers,
                                                  # reformer-pytorch; the project's deps are shared
    .venv-peers/bin/python -m experiments.peers   # defaults below: minutes on a quiet 2-core CPU
    .venv-peers/bin/python -m experiments.peers --length 1K --layers 2 --repeats 2   # smaller

One model configuration (`--layers --d-model --d-ff --heads --hashes --chunk --length --batch
--vocab`, plus `--ff-chunk`, `--buckets`) is trained, a full step of next-token cross-entropy
and AdamW in float32, by three implementations (see `experiments.peer_steps` for how each is
built and what still differs between them):

    reformer_jax      this package's ReformerLM, one jitted step
    transformers      Hugging Face ReformerModelWithLMHead
    reformer_pytorch  lucidrains' reformer_pytorch.ReformerLM

All LSH attention in every layer, reversible, causal, axial positions, dropout 0. Each repeat
runs every implementation once, in a fresh process of its own (so its peak resident set is its
own and holds only its own framework), pinned to the same `--threads` cores (PyTorch also gets
`torch.set_num_threads`); the order rotates from repeat to repeat, so load from elsewhere on the
machine falls on all alike. A process builds the model, runs `--warmup` steps (excluded; for
reformer_jax the compilation happens before them and is reported as `compile_s`), then times
`--steps` steps. Per implementation:

* `step_s`: median over repeats of each repeat's median step; `tokens_per_s` = batch * length /
  step_s;
* `peak_rss_bytes`: the largest, over repeats, peak resident set of the process during its timed
  steps (VmHWM reset just before them, and a 2 ms poll): framework runtime, compiled code,
  parameters, optimizer state and the step's activations. Before the warm-up every process hands
  back to the system what glibc kept of the memory compilation freed (`malloc_trim(0)`);
  `peak_rss_with_warmup_bytes` is the peak of the whole process. Every process, PyTorch's too,
  runs with `reformer_jax.host_memory.keep_freed_memory()` (glibc keeps freed memory mapped, so
  a step's large buffers are not faulted in afresh each step); `page_faults_per_step` counts the
  minor page faults left in the timed steps;
  `runtime_rss_bytes` (after importing and starting the framework) is reported too, and
  `peak_above_runtime_bytes`, the peak less that;
* `params`: its parameter count (they should agree to within the differences listed in
  `experiments.peer_steps`).

A peer that cannot run (not installed, out of memory, an error) gets a `note` and no numbers.
`ratios` compares reformer_jax with the fastest peer (tokens/s) and the smallest peer (peak
memory); the target is at least 2x the tokens/s with at most 0.7x the peak memory.

Writes `--out` (JSON) and a bar chart next to it (PNG); `--wandb` logs both to W&B.

    {"machine": {...}, "config": {...},
     "points": [{"implementation", "tokens_per_s", "step_s", "peak_rss_bytes", "params", "note",
                 "compile_s", "runtime_rss_bytes", "peak_above_runtime_bytes",
                 "peak_rss_with_warmup_bytes", "warmup_s", "step_samples_s", "loss", "versions",
                 "page_faults_per_step", "keeps_freed_memory",
                 "repeats"}, ...],
     "ratios": {"tokens_per_s_vs_fastest_peer", "fastest_peer", "peak_memory_vs_smallest_peer",
                "smallest_peer", "peak_above_runtime_vs_smallest_peer", "meets_target", ...}}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Any, Sequence

from experiments import common
from experiments.peer_steps import IMPLEMENTATIONS, RESULT_PREFIX
from reformer_jax import host_memory

DEFAULT_OUT = common.REPO_ROOT / 'experiments' / 'results' / 'peers_cpu.json'
TARGET_SPEEDUP = 2.0        # reformer_jax tokens/s at least this times the fastest peer's
TARGET_MEMORY_RATIO = 0.7   # and peak memory at most this times the smallest peer's
TABLE_COLUMNS = ('implementation', 'params', 'tokens_per_s', 'step_s', 'compile_s',
                 'peak_rss_bytes', 'runtime_rss_bytes', 'peak_above_runtime_bytes', 'note')


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  cores = len(os.sched_getaffinity(0))
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--layers', type=int, default=6)
  p.add_argument('--d-model', type=int, default=256)
  p.add_argument('--d-ff', type=int, default=1024,
                 help='feed-forward width (a multiple of --d-model: reformer_pytorch needs it)')
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--hashes', type=int, default=2, help='LSH hash rounds')
  p.add_argument('--chunk', type=int, default=64, help='LSH chunk length (reformer_pytorch: '
                 'bucket_size)')
  p.add_argument('--length', type=common.parse_size, default=4096,
                 help='tokens per sequence (4096, 4K); a multiple of --chunk')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--vocab', type=int, default=256)
  p.add_argument('--ff-chunk', type=int, default=0,
                 help='feed-forward chunk in tokens (0: unchunked); must divide --length')
  p.add_argument('--buckets', type=int, nargs='+', default=None,
                 help='LSH buckets (one even int, or factors); default reformer_jax\'s: about '
                      '2 * length / chunk, factorized above 2 * chunk (reformer_pytorch always '
                      'uses length / chunk)')
  p.add_argument('--steps', type=int, default=2, help='timed steps per process and repeat')
  p.add_argument('--warmup', type=int, default=1, help='excluded steps before the timed ones')
  p.add_argument('--repeats', type=int, default=3,
                 help='processes per implementation, interleaved; the median is kept')
  p.add_argument('--threads', type=int, default=cores,
                 help=f'cores every implementation is pinned to (default: all {cores})')
  p.add_argument('--implementations', nargs='+', choices=IMPLEMENTATIONS,
                 default=list(IMPLEMENTATIONS))
  p.add_argument('--lr', type=float, default=1e-4, help='AdamW learning rate')
  p.add_argument('--weight-decay', type=float, default=0.01, help='AdamW weight decay')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--timeout-s', type=float, default=1800.0,
                 help='stop a process (and note it) after this many seconds')
  p.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT,
                 help='JSON result file; the bar chart is written next to it with a .png suffix')
  p.add_argument('--profile', action='store_true',
                 help="instead of the comparison: an op-level profile (jax.profiler) of "
                      "reformer_jax's step in this process, written to <out>_profile.json")
  p.add_argument('--replot', action='store_true',
                 help='measure nothing: redraw the chart and table of an existing --out file')
  common.add_wandb_flag(p, 'the table and chart')
  args = p.parse_args(argv)
  args.command = common.command_line('experiments.peers', argv)
  for name in ('layers', 'd_model', 'd_ff', 'heads', 'hashes', 'chunk', 'batch', 'vocab', 'steps',
               'repeats', 'threads'):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
  if args.warmup < 0 or args.ff_chunk < 0:
    p.error('--warmup and --ff-chunk must be >= 0')
  if not 1 <= args.threads <= cores:
    p.error(f'--threads {args.threads}: this process may use 1 to {cores} cores')
  if args.d_model % args.heads:
    p.error(f'--d-model {args.d_model} is not divisible by --heads {args.heads}')
  if args.length % args.chunk:
    p.error(f'--length {args.length} is not a multiple of --chunk {args.chunk}: use '
            f'{-(-args.length // args.chunk) * args.chunk}')
  if args.ff_chunk and args.length % args.ff_chunk:
    p.error(f'--ff-chunk {args.ff_chunk} does not divide --length {args.length}')
  if args.d_ff % args.d_model:
    p.error(f'--d-ff {args.d_ff} is not a multiple of --d-model {args.d_model}: reformer_pytorch '
            f'sets its feed-forward width as d_model * ff_mult')
  return args


def axial_shape(length: int) -> tuple[int, int]:
  """Two factors of `length`, the first the smallest divisor at least sqrt(length) (Hugging Face
  requires their product to equal the training length exactly)."""
  first = next(f for f in range(math.isqrt(length - 1) + 1, length + 1) if length % f == 0)
  return first, length // first


def model_spec(args) -> dict[str, Any]:
  """What every implementation builds and trains: the flags, with defaults resolved."""
  from reformer_jax.attention import default_n_buckets  # pylint: disable=import-outside-toplevel
  if args.buckets:
    buckets = args.buckets[0] if len(args.buckets) == 1 else list(args.buckets)
  else:
    buckets = default_n_buckets(args.length, args.chunk)
    buckets = list(buckets) if isinstance(buckets, tuple) else buckets
  return dict(layers=args.layers, d_model=args.d_model, d_ff=args.d_ff, heads=args.heads,
              hashes=args.hashes, chunk=args.chunk, length=args.length, batch=args.batch,
              vocab=args.vocab, ff_chunk=args.ff_chunk, buckets=buckets,
              axial_shape=list(axial_shape(args.length)),
              axial_dims=[args.d_model // 2, args.d_model - args.d_model // 2],
              lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, threads=args.threads,
              warmup=args.warmup, steps=args.steps)


def run_process(spec: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
  """Runs one implementation in a fresh `python -m experiments.peer_steps` and returns what it
  reported; a failure of a PyTorch peer becomes a note, one of reformer_jax raises."""
  implementation = spec['implementation']
  cmd = [sys.executable, '-m', 'experiments.peer_steps', json.dumps(spec)]
  threads = str(spec['threads'])
  env = common.child_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                         TOKENIZERS_PARALLELISM='false', TF_CPP_MIN_LOG_LEVEL='2')
  try:
    proc = subprocess.run(cmd, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {'implementation': implementation,
            'note': f'stopped: ran longer than --timeout-s {timeout_s:.0f}'}
  records = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines()
             if line.startswith(RESULT_PREFIX)]
  if proc.returncode == 0 and records:
    return records[-1]
  tail = (proc.stderr.strip().splitlines() or ['no output'])[-1][:300]
  if proc.returncode in (-9, 137):
    return {'implementation': implementation,
            'note': f'skipped: killed, likely out of memory (exit {proc.returncode}): {tail}'}
  if implementation == 'reformer_jax':
    raise RuntimeError(f'reformer_jax failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}')
  return {'implementation': implementation, 'note': f'failed (exit {proc.returncode}): {tail}'}


def interleaved(args, spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
  """`--repeats` rounds; each runs every implementation once, the order rotated per round. An
  implementation that did not run (a note and no timings) is not tried again."""
  runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.implementations}
  names = list(args.implementations)
  for repeat in range(args.repeats):
    shift = repeat % len(names)
    for name in names[shift:] + names[:shift]:
      if runs[name] and not runs[name][-1].get('step_samples_s'):
        continue
      record = run_process(dict(spec, implementation=name), timeout_s=args.timeout_s)
      runs[name].append(record)
      samples = record.get('step_samples_s')
      print(f"repeat {repeat + 1}/{args.repeats} {name:>16}: " + (
          f"median step {common.median(samples):.3f}s, peak RSS "
          f"{record['peak_rss_bytes'] / common.GIB:.3f} GiB, {record['params']:,} params"
          + (f", compiled in {record['compile_s']:.1f}s" if record.get('compile_s') else '')
          if samples else record.get('note', 'no result')), flush=True)
  return runs


def summarize_runs(name: str, records: list[dict[str, Any]], spec: dict[str, Any]) -> dict:
  """One point per implementation from its processes (see the module docstring)."""
  done = [r for r in records if r.get('step_samples_s')]
  point: dict[str, Any] = {'implementation': name, 'tokens_per_s': None, 'step_s': None,
                           'peak_rss_bytes': None, 'params': None, 'note': None,
                           'repeats': len(done)}
  if not done:
    point['note'] = next((r.get('note') for r in records if r.get('note')), 'no result')
    point['versions'] = next((r['versions'] for r in records if 'versions' in r), None)
    return point
  step_s = common.median([common.median(r['step_samples_s']) for r in done])
  peak = max(r['peak_rss_bytes'] for r in done)
  runtime = common.median([r['runtime_rss_bytes'] for r in done])
  compile_s = [r['compile_s'] for r in done if r.get('compile_s') is not None]
  notes = sorted({r['note'] for r in records if r.get('note')})
  point.update(
      tokens_per_s=spec['batch'] * spec['length'] / step_s, step_s=step_s, peak_rss_bytes=peak,
      params=done[0]['params'], note='; '.join(notes) or None,
      compile_s=common.median(compile_s) if compile_s else None,
      runtime_rss_bytes=runtime, peak_above_runtime_bytes=peak - runtime,
      peak_rss_with_warmup_bytes=max(r['peak_rss_with_warmup_bytes'] for r in done),
      warmup_s=[r['warmup_s'] for r in done], step_samples_s=[r['step_samples_s'] for r in done],
      loss=done[-1]['loss'], versions=done[0]['versions'], cores=done[0].get('cores'),
      page_faults_per_step=[r.get('page_faults_per_step') for r in done],
      keeps_freed_memory=all(r.get('keeps_freed_memory') for r in done))
  return point


def ratios(points: list[dict[str, Any]]) -> dict[str, Any]:
  """reformer_jax against the fastest and the smallest PyTorch peer that ran."""
  ours = next((p for p in points if p['implementation'] == 'reformer_jax'), None)
  peers = [p for p in points if p['implementation'] != 'reformer_jax' and p['tokens_per_s']]
  out: dict[str, Any] = {
      'tokens_per_s_vs_fastest_peer': None, 'fastest_peer': None,
      'peak_memory_vs_smallest_peer': None, 'smallest_peer': None,
      'peak_above_runtime_vs_smallest_peer': None,
      'target_tokens_per_s_vs_fastest_peer': TARGET_SPEEDUP,
      'target_peak_memory_vs_smallest_peer': TARGET_MEMORY_RATIO, 'meets_target': None}
  if ours is None or not ours['tokens_per_s'] or not peers:
    return out
  fastest = max(peers, key=lambda p: p['tokens_per_s'])
  smallest = min(peers, key=lambda p: p['peak_rss_bytes'])
  least_above = min(peers, key=lambda p: p['peak_above_runtime_bytes'])
  out.update(
      tokens_per_s_vs_fastest_peer=ours['tokens_per_s'] / fastest['tokens_per_s'],
      fastest_peer=fastest['implementation'],
      peak_memory_vs_smallest_peer=ours['peak_rss_bytes'] / smallest['peak_rss_bytes'],
      smallest_peer=smallest['implementation'],
      peak_above_runtime_vs_smallest_peer=(ours['peak_above_runtime_bytes']
                                           / least_above['peak_above_runtime_bytes']),
      smallest_above_runtime_peer=least_above['implementation'])
  out['meets_target'] = (out['tokens_per_s_vs_fastest_peer'] >= TARGET_SPEEDUP
                         and out['peak_memory_vs_smallest_peer'] <= TARGET_MEMORY_RATIO)
  return out


def plot(result: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Two bar charts: tokens/s and peak memory per implementation, with the target lines."""
  plt = common.pyplot()
  points, cfg, r = result['points'], result['config'], result['ratios']
  names = [p['implementation'] for p in points]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  panels = ((axes[0], 'tokens_per_s', 1.0, 'tokens / s (higher is better)',
             'fastest_peer', TARGET_SPEEDUP, 'tokens_per_s_vs_fastest_peer'),
            (axes[1], 'peak_rss_bytes', common.GIB, 'peak resident memory, GiB (lower is better)',
             'smallest_peer', TARGET_MEMORY_RATIO, 'peak_memory_vs_smallest_peer'))
  for ax, key, scale, label, peer_key, target, ratio_key in panels:
    values = [(p[key] or 0) / scale for p in points]
    colors = ['tab:blue' if n == 'reformer_jax' else 'tab:gray' for n in names]
    bars = ax.bar(names, values, color=colors)
    for bar, p in zip(bars, points):
      text = 'did not run' if not p[key] else (
          f'{bar.get_height():,.0f}' if key == 'tokens_per_s' else f'{bar.get_height():.3f}')
      ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha='center',
                  va='bottom', fontsize=8)
    peer = next((p for p in points if p['implementation'] == r.get(peer_key)), None)
    if peer is not None:
      ax.axhline(target * peer[key] / scale, color='tab:red', lw=0.8, ls='--')
      ax.text(0.01, target * peer[key] / scale, f'target: {target:g}x {peer["implementation"]}',
              color='tab:red', fontsize=8, va='bottom', transform=ax.get_yaxis_transform())
    if r.get(ratio_key) is not None:
      ax.set_title(f'reformer_jax / {r[peer_key]}: {r[ratio_key]:.2f}x', fontsize=10)
    ax.set_ylabel(label)
    ax.tick_params(axis='x', labelsize=8)
    ax.grid(True, axis='y', alpha=0.3)
  fig.suptitle(f"Training step, {cfg['layers']} layers, d_model {cfg['d_model']}, d_ff "
               f"{cfg['d_ff']}, {cfg['heads']} heads, {cfg['hashes']} hashes, chunk "
               f"{cfg['chunk']}, {common.human(cfg['length'])} x {cfg['batch']} tokens, "
               f"{cfg['threads']} thread(s)\n{common.machine_title(result['machine'])}", fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _gib(n: int | None) -> str | None:
  return None if n is None else f'{n / common.GIB:.3f} GiB'


def table(result: dict[str, Any]) -> str:
  """Markdown: one row per implementation, then the ratios against the peers."""
  rows = [dict(p, params=p['params'] and f"{p['params']:,}",
               **{k: _gib(p.get(k)) for k in ('peak_rss_bytes', 'runtime_rss_bytes',
                                              'peak_above_runtime_bytes')})
          for p in result['points']]
  r = result['ratios']
  lines = [common.markdown_table(rows, TABLE_COLUMNS)]
  if r['tokens_per_s_vs_fastest_peer'] is not None:
    lines.append(
        f"reformer_jax: {r['tokens_per_s_vs_fastest_peer']:.2f}x the tokens/s of "
        f"{r['fastest_peer']} (target >= {TARGET_SPEEDUP:g}x), "
        f"{r['peak_memory_vs_smallest_peer']:.2f}x the peak memory of {r['smallest_peer']} "
        f"(target <= {TARGET_MEMORY_RATIO:g}x; above the framework runtime: "
        f"{r['peak_above_runtime_vs_smallest_peer']:.2f}x {r['smallest_above_runtime_peer']}); "
        f"meets target: {r['meets_target']}")
  return '\n\n'.join(lines)


def peer_versions() -> dict[str, str | None]:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  out = {}
  for name in ('torch', 'transformers', 'reformer-pytorch'):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def run(args: argparse.Namespace) -> dict[str, Any]:
  spec = model_spec(args)
  config = dict(spec, implementations=args.implementations, repeats=args.repeats,
                command=args.command, optimizer='AdamW', dtype='float32', dropout=0.0)
  machine = dict(common.machine_info(),
                 **{f"{k.replace('-', '_')}_version": v for k, v in peer_versions().items()})
  runs = interleaved(args, spec)
  points = [summarize_runs(name, runs[name], spec) for name in args.implementations]
  result = {'machine': machine, 'config': config, 'points': points, 'ratios': ratios(points)}
  common.write_json(args.out, result)
  png = plot(result, args.out.with_suffix('.png'))
  print(table(result))
  print(f'wrote {args.out} and {png}')
  common.log_to_wandb(args.wandb, job='peers', config=config, rows=points, columns=TABLE_COLUMNS,
                      images={'plot': png}, summary={
                          k: v for k, v in result['ratios'].items() if isinstance(v, float)})
  return result


def profile(args: argparse.Namespace) -> dict[str, Any]:
  """Where reformer_jax's training step spends its time, by HLO op and op category."""
  from experiments import peer_steps  # pylint: disable=import-outside-toplevel
  spec = dict(model_spec(args), implementation='reformer_jax')
  built = peer_steps.build_reformer_jax(spec)
  print(f"reformer_jax step, {spec['layers']} layers, d_model {spec['d_model']}, "
        f"{spec['batch']} x {spec['length']} tokens:")
  result = {'machine': common.machine_info(), 'config': spec,
            **common.profile_summary(common.op_profile(built.compiled, built.step))}
  path = args.out.with_name(args.out.stem + '_profile.json')
  common.write_json(path, result)
  print(f'wrote {path}')
  return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  host_memory.keep_freed_memory()  # before the first computation
  if args.profile:
    return profile(args)
  if args.replot:
    result = json.loads(args.out.read_text(encoding='utf-8'))
    print(table(result))
    print(f"wrote {plot(result, args.out.with_suffix('.png'))}")
    return result
  return run(args)


if __name__ == '__main__':
  main(sys.argv[1:])
