"""Peak memory of a Reformer training step against depth and length, and the 1M-token case.

    python -m experiments.memory --quick                 # a few minutes on 2 CPU cores
    python -m experiments.memory --out experiments/results/memory_cpu.json
    python -m experiments.memory --headline-only --out experiments/results/memory_1m_cpu.json
    python -m experiments.memory --headline-only --dtype bfloat16 --compile-only \
        --out experiments/results/memory_1m_bf16_cpu.json

Five models, each a `ReformerLM` trained by one SGD step (cross-entropy, parameters donated):

    standard               full attention, ordinary residual stack
    reversible             full attention, reversible stack
    reversible_chunked_ff  full attention, reversible stack, feed-forward in chunks
    lsh                    LSH attention, ordinary residual stack
    reformer               LSH attention, reversible stack, feed-forward in chunks

swept over depth (`--depths` at `--depth-length` tokens) and over length (`--lengths` at
`--length-layers` layers), batch 1. For each point:

* compiled: `compiled.memory_analysis()` of the jitted step, peak = arguments + outputs +
  temporaries - donated (aliased) bytes. Always reported, also for points too big to run.
* measured (unless `--compile-only`): the step runs in a fresh subprocess (after a warm-up
  step when it is cheap), so each configuration's numbers are its own; on the CPU, the process's
  peak resident set during the step (the larger of the kernel's VmHWM, reset just before the
  step, and a 2 ms poll of the resident set) and `rss_step_bytes`, its rise over the resident
  set once parameters and tokens were in place (runtime, compiled code and parameters were
  already resident, so this compares with the compiled temporaries plus outputs); on an
  accelerator, `device.memory_stats()['peak_bytes_in_use']`. A point runs only if its compiled
  peak fits in `--memory-margin` of the available memory and its estimated time is below
  `--max-step-s`; otherwise it carries a note saying why.

`--headline` adds the seeds' case: 12 layers, d_model 512, one sequence of 1,048,576 tokens
(the reformer model): its compiled peak against 16 GiB, and if it fits in this machine's memory
with margin, one measured training step.

Writes `--out` (JSON) and a PNG next to it; `--wandb` logs both to W&B.

    {"machine": {...}, "config": {...}, "summary": {...}, "headline": {...} | null,
     "points": [{"sweep", "variant", "attention", "reversible", "ff_chunk_len", "n_layers",
                 "length", "batch", "compiled_bytes", "compiled_argument_bytes",
                 "compiled_output_bytes", "compiled_temp_bytes", "compiled_alias_bytes",
                 "flops_xla", "compile_s", "step_s", "rss_peak_bytes", "rss_step_bytes",
                 "device_peak_bytes", "note"}, ...]}
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Sequence

# The parent (which times a matmul) and each child process share one accelerator: allocate on
# demand rather than JAX's default 75% up front, so a child gets the whole device and its
# `peak_bytes_in_use` is its own. Set before JAX starts (experiments.common imports it).
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from experiments import common  # noqa: E402  pylint: disable=wrong-import-position
from experiments.rss import RssSampler
from experiments.rss import proc_status as _proc_status
from experiments.rss import reset_peak_rss as _reset_peak_rss

VARIANTS = {  # name: (attention, reversible, chunked feed-forward)
    'standard': ('full', False, False),
    'reversible': ('full', True, False),
    'reversible_chunked_ff': ('full', True, True),
    'lsh': ('lsh', False, False),
    'reformer': ('lsh', True, True),
}
HEADLINE = dict(n_layers=12, d_model=512, length=2 ** 20, variant='reformer')
HEADLINE_BUDGET_BYTES = 16 * common.GIB
DEFAULT_OUT = common.REPO_ROOT / 'experiments' / 'results' / 'memory_cpu.json'
RESULT_PREFIX = 'MEMORY_RESULT '
TABLE_COLUMNS = ('sweep', 'variant', 'n_layers', 'length', 'compiled_bytes', 'compiled_temp_bytes',
                 'rss_step_bytes', 'rss_peak_bytes', 'device_peak_bytes', 'step_s', 'note')


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--depths', nargs='+', type=int, default=None,
                 help='layer counts of the depth sweep (default 2 4 8 12 16 24; --quick: 2 12)')
  p.add_argument('--depth-length', type=common.parse_size, default=None,
                 help='tokens per sequence in the depth sweep (default 4K; --quick: 1K)')
  p.add_argument('--lengths', nargs='+', default=None,
                 help='lengths of the length sweep (default 1K..64K; --quick: 1K 4K 16K)')
  p.add_argument('--length-layers', type=int, default=2, help='layers in the length sweep')
  p.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS))
  p.add_argument('--d-model', type=int, default=512)
  p.add_argument('--d-ff', type=int, default=2048)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--hashes', type=int, default=2, help='LSH hash rounds')
  p.add_argument('--chunk-len', type=int, default=64, help='LSH chunk length')
  p.add_argument('--ff-chunk-len', type=int, default=512,
                 help='feed-forward chunk (tokens) of the chunked variants (capped at the length)')
  p.add_argument('--vocab-size', type=int, default=256)
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='compute dtype of every model (parameters stay float32)')
  p.add_argument('--compile-only', action='store_true', help='compiled analysis only, no runs')
  p.add_argument('--memory-margin', type=float, default=0.7,
                 help='run a point only if its compiled peak is below this fraction of the '
                      'available memory')
  p.add_argument('--max-step-s', type=float, default=None,
                 help='skip runs estimated to take longer (default 300; --quick: 60); a run '
                      'that takes 3x longer than this plus compilation is stopped')
  p.add_argument('--headline', action='store_true',
                 help='also the 12-layer, d_model 512, 1,048,576-token reformer step')
  p.add_argument('--headline-only', action='store_true', help='only the headline case')
  p.add_argument('--headline-length', type=common.parse_size, default=HEADLINE['length'],
                 help='length of the headline case (tests shrink it)')
  p.add_argument('--headline-layers', type=int, default=HEADLINE['n_layers'])
  p.add_argument('--quick', action='store_true',
                 help='a few minutes on a 2-core CPU: depths 2 12 at 1K, lengths 1K 4K 16K, runs '
                      'estimated over 60s compile-only')
  p.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  common.add_wandb_flag(p)
  p.add_argument('--replot', action='store_true',
                 help='measure nothing: redraw the plot and tables of an existing --out file')
  p.add_argument('--child', help=argparse.SUPPRESS)  # internal: one configuration, as JSON
  args = p.parse_args(argv)
  args.command = common.command_line('experiments.memory', argv)
  quick = args.quick
  args.depths = args.depths or ([2, 12] if quick else [2, 4, 8, 12, 16, 24])
  args.depth_length = args.depth_length or (1024 if quick else 4096)
  args.lengths = common.size_list(args.lengths or (['1K', '4K', '16K'] if quick else
                                                   ['1K', '2K', '4K', '8K', '16K', '32K', '64K']))
  args.max_step_s = args.max_step_s or (60.0 if quick else 300.0)
  args.headline = args.headline or args.headline_only
  return args


# ---------------------------------------------------------------------------------------------
# One configuration (runs in the child process).

def model_config(point: dict[str, Any]):
  from reformer_jax.model_config import ModelConfig  # pylint: disable=import-outside-toplevel
  attention, reversible, chunked = VARIANTS[point['variant']]
  length = point['length']
  return ModelConfig(
      vocab_size=point['vocab_size'], d_model=point['d_model'], d_ff=point['d_ff'],
      n_heads=point['heads'], n_layers=point['n_layers'], attention_types=(attention,),
      max_len=length, chunk_len=min(point['chunk_len'], length), n_hashes=point['hashes'],
      reversible=reversible,
      ff_chunk_len=min(point['ff_chunk_len'], length) if chunked else 0,
      dtype=point.get('dtype', 'float32'))


def train_step_fn(model):
  """One SGD step on next-token cross-entropy; returns the new parameters and the loss.

  The loss goes through the trainer's `chunked_token_sums`, as in `reformer_jax.train`: long
  sequences project features to logits a chunk of positions at a time.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from reformer_jax.models import ReformerLM  # pylint: disable=import-outside-toplevel
  from reformer_jax.train import chunked_token_sums  # pylint: disable=import-outside-toplevel

  def train_step(params, tokens, rng):
    def loss_fn(p):
      features = model.apply({'params': p}, tokens, rng=rng, train=True,
                             method=ReformerLM.features)
      # Position t predicts token t + 1; the last position has no target.
      weights = (jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1).astype(jnp.float32)
      sums = chunked_token_sums(
          lambda x: model.apply({'params': p}, x, method=ReformerLM.logits), features,
          jnp.roll(tokens, -1, axis=1), jnp.broadcast_to(weights, tokens.shape))
      return sums['loss'] / sums['weight']
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads), loss
  return train_step


def _emit(record: dict[str, Any]) -> None:
  print(RESULT_PREFIX + json.dumps(record), flush=True)


def child(point: dict[str, Any]) -> None:
  """Compiles, reports the compiled analysis, then (if asked and it fits) runs one step."""
  import jax  # pylint: disable=import-outside-toplevel
  from reformer_jax.train import backend_options  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from reformer_jax.models import ReformerLM  # pylint: disable=import-outside-toplevel

  cfg = model_config(point)
  model = ReformerLM(cfg)
  batch, length = point['batch'], point['length']
  # Parameters do not depend on the input length: initialize on one short chunk.
  init_len = min(length, cfg.chunk_len)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((batch, init_len), jnp.int32),
                                        rng=jax.random.PRNGKey(1))['params'])
  params_shape = jax.eval_shape(init, jax.random.PRNGKey(0))
  tokens_shape = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  rng_spec = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  start = time.perf_counter()
  # Compiled as the trainer compiles (reformer_jax.train.backend_options).
  compiled = jax.jit(train_step_fn(model), donate_argnums=0,
                     compiler_options=backend_options() or None).lower(
      params_shape, tokens_shape, rng_spec).compile()
  mem = common.CompiledMemory.of(compiled)
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  result = dict(compiled_bytes=mem.peak, compiled_argument_bytes=mem.argument,
                compiled_output_bytes=mem.output, compiled_temp_bytes=mem.temp,
                compiled_alias_bytes=mem.alias, flops_xla=cost.get('flops'),
                n_params=sum(x.size for x in jax.tree.leaves(params_shape)),
                compile_s=time.perf_counter() - start)
  _emit(result)
  if not point['run']:
    return
  ok, note = common.fits(mem.peak, margin=point['memory_margin'])
  if not ok:
    _emit({'note': note})
    return

  params = init(jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (batch, length), 1, cfg.vocab_size)
  rng = jax.random.PRNGKey(3)
  common.block((params, tokens))
  gc.collect()
  # Parameters, tokens, runtime and compiled code are resident: the step's own memory is what
  # the resident set rises above this. (Measured from here rather than after the warm-up step:
  # the allocator keeps memory the warm-up freed, and the measured step reuses it.)
  rss_baseline = _proc_status('VmRSS')
  try:
    if point['warmup']:  # its one-off allocations (thread pools ...) are then already made
      params, loss = compiled(params, tokens, rng)
      common.block((params, loss))
    gc.collect()
    rss_before = _proc_status('VmRSS')
    reset = _reset_peak_rss()
    with RssSampler() as sampler:
      start = time.perf_counter()
      params, loss = compiled(params, tokens, rng)
      common.block((params, loss))
      step_s = time.perf_counter() - start
  except jax.errors.JaxRuntimeError as err:
    if not common.is_resource_exhausted(err):
      raise
    _emit({'note': common.out_of_memory_note(err)})
    return
  hwm = _proc_status('VmHWM') if reset else None
  rss_peak = max(hwm or 0, sampler.peak)
  stats = jax.devices()[0].memory_stats() or {}
  _emit(dict(step_s=step_s, warmup=point['warmup'], loss=float(loss),
             rss_baseline_bytes=rss_baseline, rss_before_step_bytes=rss_before,
             rss_hwm_bytes=hwm, rss_sampled_peak_bytes=sampler.peak, rss_peak_bytes=rss_peak,
             rss_step_bytes=rss_peak - rss_baseline,
             device_peak_bytes=stats.get('peak_bytes_in_use')))


# ---------------------------------------------------------------------------------------------
# The sweep (parent process).

def estimated_step_s(point: dict[str, Any], flops_per_s: float) -> float:
  """A rough time for one training step: 8 (fwd, bwd, reversible recompute) or 6 FLOPs per
  parameter per token, plus attention logits, at 20% of the matmul rate (what LSH reaches here).
  """
  attention, reversible, _ = VARIANTS[point['variant']]
  d, length, layers = point['d_model'], point['length'], point['n_layers']
  per_token = (8 if reversible else 6) * layers * (4 * d * d + 2 * d * point['d_ff'])
  per_token += 6 * d * point['vocab_size']
  keys = length if attention == 'full' else 2 * min(point['chunk_len'], length) * point['hashes']
  per_token += (16 if reversible else 12) * layers * d * keys
  return per_token * length * point['batch'] / (0.2 * flops_per_s)


def measure(point: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
  """Runs `point` in a fresh Python process and merges what it reported into a copy of it."""
  cmd = [sys.executable, '-m', 'experiments.memory', '--child', json.dumps(point)]
  env = common.child_env()
  out = dict(point, compiled_bytes=None, compile_s=None, step_s=None, rss_peak_bytes=None,
             rss_step_bytes=None, device_peak_bytes=None, note=point.get('note'))
  try:
    proc = subprocess.run(cmd, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    stdout, stderr, failed = proc.stdout, proc.stderr, proc.returncode != 0
  except subprocess.TimeoutExpired as err:
    stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or '')
    stderr, failed = '', False
    out['note'] = f'stopped: the step ran longer than {timeout_s:.0f}s'
  for line in stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      record = json.loads(line[len(RESULT_PREFIX):])
      if record.get('note') is None:
        record.pop('note', None)
      out.update(record)
  if failed:
    tail = stderr.strip().splitlines()[-1:] or ['no output']
    if 'RESOURCE_EXHAUSTED' in stderr or proc.returncode in (-9, 137):
      out['note'] = f'skipped: out of memory (exit {proc.returncode}: {tail[0][:200]})'
    else:
      raise RuntimeError(f'memory child failed for {point}:\n{stderr[-3000:]}')
  return out


def base_point(args, **changes) -> dict[str, Any]:
  point = dict(batch=1, d_model=args.d_model, d_ff=args.d_ff, heads=args.heads,
               hashes=args.hashes, chunk_len=args.chunk_len, ff_chunk_len=args.ff_chunk_len,
               vocab_size=args.vocab_size, dtype=args.dtype, memory_margin=args.memory_margin,
               run=not args.compile_only, note=None)
  point.update(changes)
  attention, reversible, chunked = VARIANTS[point['variant']]
  point.update(attention=attention, reversible=reversible,
               ff_chunk_len=min(point['ff_chunk_len'], point['length']) if chunked else 0)
  return point


def sweep_points(args) -> list[dict[str, Any]]:
  points = []
  if not args.headline_only:
    for variant in args.variants:
      points += [base_point(args, sweep='depth', variant=variant, n_layers=n,
                            length=args.depth_length) for n in args.depths]
      points += [base_point(args, sweep='length', variant=variant, n_layers=args.length_layers,
                            length=length) for length in args.lengths]
  return points


def _config_key(point):
  return tuple(sorted((k, v) for k, v in point.items() if k not in ('sweep', 'note')))


def run_points(points, args, flops_per_s) -> list[dict[str, Any]]:
  done: dict[tuple, dict] = {}
  results = []
  for point in points:
    key = _config_key(point)
    if key not in done:
      estimate = estimated_step_s(point, flops_per_s)
      # A warm-up step when it is cheap: the first execution also allocates one-off runtime state.
      point = dict(point, warmup=2 * estimate <= args.max_step_s)
      if point['run'] and estimate > args.max_step_s:
        point = dict(point, run=False, note=(
            f'not run: estimated {estimate:.0f}s per step, more than --max-step-s '
            f'{args.max_step_s:.0f}'))
      done[key] = measure(point, timeout_s=3 * args.max_step_s + 600)
    result = dict(done[key], sweep=point['sweep'])
    results.append(result)
    print(f"{result['sweep']:>8} {result['variant']:>22} layers={result['n_layers']:<3} "
          f"L={common.human(result['length']):>5}: compiled "
          f"{(result['compiled_bytes'] or 0) / common.GIB:8.3f} GiB, step RSS "
          f"{(result['rss_step_bytes'] or 0) / common.GIB:7.3f} GiB, step "
          f"{result['step_s'] or 0:7.2f}s {result['note'] or ''}", flush=True)
  return results


def summarize(points: list[dict[str, Any]], args) -> dict[str, Any]:
  """Depth growth (12 vs 2 layers; target <= 1.5 for the reformer) and length growth."""
  summary: dict[str, Any] = {'depth_ratio_12_vs_2': {}, 'depth_ratio_max_vs_min': {}}
  for variant in args.variants:
    depth = {p['n_layers']: p for p in points if p['sweep'] == 'depth' and p['variant'] == variant}
    ratios = {}
    if 2 in depth and 12 in depth:
      for kind in ('compiled_bytes', 'rss_step_bytes'):
        if depth[2].get(kind) and depth[12].get(kind):
          ratios[kind] = depth[12][kind] / depth[2][kind]
      # Without the float32 parameters and their gradients, which grow with depth whatever
      # the architecture (at 4K tokens they are most of the Reformer's growth).
      beyond = [p['compiled_bytes'] - 2 * 4 * p['n_params'] if p.get('compiled_bytes')
                and p.get('n_params') else None for p in (depth[2], depth[12])]
      if all(beyond):
        ratios['compiled_bytes_beyond_parameters'] = beyond[1] / beyond[0]
    summary['depth_ratio_12_vs_2'][variant] = ratios
    if len(depth) >= 2:
      lo, hi = min(depth), max(depth)
      if depth[lo]['compiled_bytes'] and depth[hi]['compiled_bytes']:
        summary['depth_ratio_max_vs_min'][variant] = {
            'layers': f'{hi} vs {lo}',
            'compiled_bytes': depth[hi]['compiled_bytes'] / depth[lo]['compiled_bytes']}
  return summary


def headline(args, flops_per_s) -> dict[str, Any]:
  point = base_point(args, sweep='headline', variant=HEADLINE['variant'],
                     n_layers=args.headline_layers, length=args.headline_length,
                     d_model=HEADLINE['d_model'])
  point['warmup'] = False  # one step only: at 1M tokens a step is long

  result = measure(point, timeout_s=24 * args.max_step_s + 1200)
  peak = result['compiled_bytes']
  result['fits_16gib'] = None if peak is None else peak <= HEADLINE_BUDGET_BYTES
  result['budget_bytes'] = HEADLINE_BUDGET_BYTES
  print(f"headline: {result['n_layers']} layers, d_model {result['d_model']}, "
        f"{result['length']:,} tokens: compiled {(peak or 0) / common.GIB:.2f} GiB "
        f"(fits in 16 GiB: {result['fits_16gib']}); measured step RSS "
        f"{(result['rss_step_bytes'] or 0) / common.GIB:.2f} GiB, {result['step_s']} s "
        f"{result['note'] or ''}", flush=True)
  return result


def tables(result: dict[str, Any]) -> str:
  """Markdown: compiled peak GiB (measured step GiB) per variant, for each sweep (README)."""
  points, cfg = result['points'], result['config']
  variants = [v for v in VARIANTS if any(p['variant'] == v for p in points)]
  out = []
  for sweep, key in (('depth', 'n_layers'), ('length', 'length')):
    what = (f"depth sweep at {common.human(cfg['depth_length'])} tokens" if sweep == 'depth'
            else f"length sweep at {cfg['length_layers']} layers")
    rows = []
    for x in sorted({p[key] for p in points if p['sweep'] == sweep}):
      row = {key: common.human(x) if key == 'length' else x}
      for v in variants:
        p = next((p for p in points if p['sweep'] == sweep and p['variant'] == v and p[key] == x),
                 None)
        if p is not None and p['compiled_bytes']:
          row[v] = f"{p['compiled_bytes'] / common.GIB:.2f}" + (
              f" ({p['rss_step_bytes'] / common.GIB:.2f})" if p.get('rss_step_bytes') else '')
      rows.append(row)
    if rows:
      out.append(f'{what}: compiled peak GiB (measured rise of the resident set during the step, '
                 f'GiB, where it ran)\n\n' + common.markdown_table(rows, [key, *variants]))
  return '\n\n'.join(out)


def plot(result: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Peak memory vs depth and vs length: compiled (solid) and measured step RSS (dashed)."""
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  cfg = result['config']
  for ax, sweep in zip(axes, ('depth', 'length')):
    for i, variant in enumerate(VARIANTS):
      pts = sorted((p for p in result['points'] if p['sweep'] == sweep and p['variant'] == variant),
                   key=lambda p: p['n_layers' if sweep == 'depth' else 'length'])
      x_key = 'n_layers' if sweep == 'depth' else 'length'
      compiled = [(p[x_key], p['compiled_bytes'] / common.GIB) for p in pts if p['compiled_bytes']]
      measured = [(p[x_key], p['rss_step_bytes'] / common.GIB) for p in pts if p['rss_step_bytes']]
      color = plt.cm.tab10(i)
      if compiled:
        ax.plot(*zip(*compiled), 'o-', color=color, label=variant)
      if measured:
        ax.plot(*zip(*measured), 'x--', color=color, alpha=0.7)
    ax.set_yscale('log')
    ax.axhline(16, color='gray', lw=0.8, ls=':')
    ax.text(0.01, 16, '16 GiB', va='bottom', fontsize=8, color='gray',
            transform=ax.get_yaxis_transform())
    if sweep == 'depth':
      ax.set_xlabel('layers')
      ax.set_title(f"depth sweep at {common.human(cfg['depth_length'])} tokens", fontsize=10)
    else:
      ax.set_xscale('log', base=2)
      lengths = sorted({p['length'] for p in result['points'] if p['sweep'] == 'length'})
      ax.set_xticks(lengths, [common.human(n) for n in lengths])
      ax.minorticks_off()
      ax.set_xlabel('sequence length (tokens)')
      ax.set_title(f"length sweep, {cfg['length_layers']} layers", fontsize=10)
    ax.set_ylabel('GiB (solid: compiled peak, dashed: measured step)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"Training-step memory, d_model {cfg['d_model']}, d_ff {cfg['d_ff']}, "
               f"{cfg['heads']} heads, {cfg['hashes']} hashes, batch 1 — "
               f"{common.machine_title(result['machine'])}", fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def run(args: argparse.Namespace) -> dict[str, Any]:
  config = {k: v for k, v in vars(args).items() if k not in ('out', 'wandb', 'child')}
  config['optimizer'] = 'sgd (parameters donated)'
  result: dict[str, Any] = {'machine': common.machine_info(), 'config': config}
  flops_per_s, _ = common.matmul_flops_per_s()
  result['points'] = run_points(sweep_points(args), args, flops_per_s)
  result['summary'] = summarize(result['points'], args)
  result['headline'] = headline(args, flops_per_s) if args.headline else None
  common.write_json(args.out, result)
  png = plot(result, args.out.with_suffix('.png'))
  rows = result['points'] + ([result['headline']] if result['headline'] else [])
  print(common.markdown_table(rows, TABLE_COLUMNS))
  print(tables(result))
  print('summary:', json.dumps(result['summary'], indent=1))
  print(f'wrote {args.out} and {png}')
  common.log_to_wandb(args.wandb, job='memory', config=config, rows=rows, columns=TABLE_COLUMNS,
                      images={'plot': png}, summary={
                          f'depth_ratio_12_vs_2/{v}': r.get('compiled_bytes')
                          for v, r in result['summary']['depth_ratio_12_vs_2'].items()})
  return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  args = parse_args(argv)
  if args.child:
    child(json.loads(args.child))
    return None
  if args.replot:
    result = json.loads(args.out.read_text(encoding='utf-8'))
    result['summary'] = summarize(result['points'], argparse.Namespace(**result['config']))
    common.write_json(args.out, result)
    print(tables(result))
    print('summary:', json.dumps(result['summary'], indent=1))
    print(f"wrote {plot(result, args.out.with_suffix('.png'))}")
    return result
  return run(args)


if __name__ == '__main__':
  main(sys.argv[1:])
