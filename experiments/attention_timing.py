"""Attention timing curves: full vs local vs LSH attention against sequence length (paper Fig. 5).

    python -m experiments.attention_timing --quick          # a few minutes on 2 CPU cores
    python -m experiments.attention_timing                  # 1K..64K: about an hour there
    python -m experiments.attention_timing --profile --lengths 16K --hashes 4  # op profile

Times the forward pass and the forward+backward pass (gradients of the inputs, output kept
live) of one attention layer's kernel on `[B, L, N, H]` float32 inputs:

* `full`: `jax.nn.dot_product_attention` (separate q, k), O(L^2);
* `cudnn` (GPU only, included by default there): cuDNN's fused flash attention,
  `jax.nn.dot_product_attention(..., implementation='cudnn')` on bfloat16 inputs (cuDNN's
  kernel takes 16-bit floats), O(L^2) FLOPs in O(L) memory; elsewhere, or where cuDNN lacks the
  kernel, its points carry a note instead of times;
* `local`: `reformer_jax.attention.local_attention`, chunks of `--chunk-len` seeing one chunk back;
* `lsh`: `reformer_jax.attention.lsh_attention` (shared qk) with each of `--hashes` rounds.

Two regimes: `fixed_tokens` (batch * length = `--tokens`, the paper's Figure 5: flat time per
token means linear cost) and `batch1`. Each attention kind (full, local, LSH with all its hash
counts) runs in its own worker process, the references in another (`run_workers`;
`--one-process`: all in this one). Everything is compiled first (compile time is reported apart),
each function is warmed up once (excluded), then all functions of all lengths are timed
round-robin, `--repeats` rounds (round r asks each process in turn), and the median is kept:
load from other processes on a shared machine then hits every point alike. A round's sample of a
function is the fastest of `--calls` back-to-back calls, as for the matmul reference. A point whose compiled memory
(`compiled.memory_analysis()`) does not fit in the available memory (or `--max-bytes`) is
skipped with a note, and so is one that runs out of memory (XLA `RESOURCE_EXHAUSTED`) while
running.

FLOPs of the forward+backward pass follow the issue's count, 12 * R * B * L * N * H * K
(R hash rounds, K keys per query: the chunk window `2 * chunk_len` for LSH and local, L for full
attention, which computes every logit even when causal). `flops_fraction` divides a point's
best achieved FLOP/s by the best of a `--matmul-size` float32 matmul timed in every round of
the same run; `flops_fraction_paired` pairs each sample with its own round's matmul (see
`summarize`). The kernel's own six matmuls alone, as XLA batches them (`chunk_matmuls`:
batched `[C, H] x [H, 2C]` products at `--tokens` tokens), are timed in every round as well:
what XLA reaches on them (`chunk_matmuls_flops_fraction`) bounds the XLA version of the chunk
step; on CPU the compiled chunk kernel (`reformer_jax.attention.cpu_kernel`, recorded as
`config.chunk_kernel`) does those products itself and can exceed it.
Kernels and matmuls compile with the trainer's XLA options (`reformer_jax.train.backend_options`),
and the workers keep freed host memory mapped (`reformer_jax.host_memory`; all but full
attention's, see `Worker`; each point records `keeps_freed_memory`).

Writes `--out` (JSON) and a PNG next to it; `--wandb` logs both to W&B; `--replot` redraws the
PNG of an existing file; `--profile` writes `<out>_profile.json` instead (time by HLO op).

    {"machine": {"backend", "device", "jax_version", "cpu", ...}, "config": {...},
     "matmul_flops_per_s": float, "matmul": {...}, "chunk_matmuls": {...}, "summary": {...},
     "points": [{"regime", "length", "batch", "attention", "n_hashes", "fwd_s", "fwd_bwd_s",
                 "compile_s", "compile_fwd_s", "compiled_bytes", "compiled_fwd_bytes", "flops",
                 "flops_fraction", "flops_fraction_paired", "time_per_token_s", "repeats",
                 "fwd_samples_s", "fwd_rounds", "fwd_bwd_samples_s", "fwd_bwd_rounds", "note",
                 "keeps_freed_memory"},
                ...]}

`fwd_s`, `fwd_bwd_s` are medians in seconds (None when skipped; `note` says why), `compile_s`
is the compile time of the forward+backward function, `compiled_bytes` its compiled peak
(arguments + outputs + temporaries).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from experiments import common, rss
from reformer_jax import host_memory
from reformer_jax.attention import cpu_kernel, local_attention, lsh_attention

REGIMES = ('fixed_tokens', 'batch1')
REFERENCE_CALLS = 3  # back-to-back calls of each reference per round; the fastest is its sample
ATTENTIONS = ('full', 'cudnn', 'local', 'lsh')
DEFAULT_OUT = common.REPO_ROOT / 'experiments' / 'results' / 'attention_timing_cpu.json'
TABLE_COLUMNS = ('regime', 'length', 'batch', 'attention', 'n_hashes', 'fwd_s', 'fwd_bwd_s',
                 'compile_s', 'compiled_bytes', 'time_per_token_s', 'flops_fraction', 'note')


@dataclasses.dataclass(frozen=True)
class Variant:
  attention: str       # 'full' | 'cudnn' | 'local' | 'lsh'
  n_hashes: int | None  # LSH hash rounds; None for full and local

  @property
  def label(self) -> str:
    return f'lsh-{self.n_hashes}' if self.attention == 'lsh' else self.attention


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--lengths', nargs='+', default=None,
                 help='sequence lengths, e.g. 1K 2K 4K (default 1K..64K; --quick: 1K 2K 4K)')
  p.add_argument('--hashes', nargs='+', type=int, default=None,
                 help='LSH hash rounds to time (default 1 2 4 8; --quick: 1 4)')
  p.add_argument('--tokens', type=common.parse_size, default=None,
                 help='batch * length of the fixed_tokens regime (default 64K; --quick: 4K)')
  p.add_argument('--repeats', type=int, default=None,
                 help='timed calls per function after one warm-up; the median is kept (default 5; '
                      '--quick: 3)')
  p.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT,
                 help='JSON result file; the plot is written next to it with a .png suffix')
  p.add_argument('--quick', action='store_true',
                 help='a few minutes on a 2-core CPU: lengths 1K 2K 4K, hashes 1 4, 4K tokens')
  p.add_argument('--attention', nargs='+', choices=ATTENTIONS, default=None,
                 help="kernels to time (default: all; 'cudnn' only on a GPU)")
  p.add_argument('--regimes', nargs='+', choices=REGIMES, default=list(REGIMES))
  p.add_argument('--heads', type=int, default=2,
                 help='N attention heads (2 keeps full attention at 16K within 8 GiB)')
  p.add_argument('--head-dim', type=int, default=64, help='H per-head width')
  p.add_argument('--chunk-len', type=int, default=64, help='LSH and local chunk length C')
  p.add_argument('--no-causal', dest='causal', action='store_false', help='bidirectional')
  p.add_argument('--budget-s', type=float, default=120.0,
                 help='time budget per timed function: fewer repeats (at least 1) when the '
                      'warm-up call says the repeats would take longer')
  p.add_argument('--calls', type=int, default=REFERENCE_CALLS,
                 help='back-to-back calls of each function per round, the fastest its sample, '
                      'as for the matmul reference (default %(default)s; 1: a single call right '
                      'after the previous function, the method of files before this flag)')
  p.add_argument('--one-process', action='store_true',
                 help='time every attention kind and the references in this process (the method '
                      'of files before this flag) instead of one worker process each')
  p.add_argument('--memory-margin', type=float, default=0.7,
                 help='run a point only if its compiled memory is below this fraction of the '
                      'available memory')
  p.add_argument('--max-bytes', type=common.parse_size, default=None,
                 help='also skip points whose compiled memory exceeds this (e.g. 16384M to see '
                      'what a 16 GiB accelerator would hold)')
  p.add_argument('--matmul-size', type=int, default=2048,
                 help='side of the float32 matmul whose FLOP/s are the reference')
  p.add_argument('--profile', action='store_true',
                 help='instead of timing: an op-level profile (jax.profiler) of LSH fwd+bwd at '
                      'batch 1 for each of --lengths and --hashes, written to <out>_profile.json')
  p.add_argument('--replot', action='store_true',
                 help='measure nothing: redraw the plot and summary of an existing --out file')
  common.add_wandb_flag(p)
  args = p.parse_args(argv)
  args.command = common.command_line('experiments.attention_timing', argv)
  quick = args.quick
  if args.attention is None:
    args.attention = [a for a in ATTENTIONS if a != 'cudnn' or jax.default_backend() == 'gpu']
  args.lengths = common.size_list(args.lengths or (['1K', '2K', '4K'] if quick else
                                                   ['1K', '2K', '4K', '8K', '16K', '32K', '64K']))
  args.hashes = args.hashes or ([1, 4] if quick else [1, 2, 4, 8])
  args.tokens = args.tokens or (4 * 1024 if quick else 64 * 1024)
  args.repeats = args.repeats or (3 if quick else 5)
  if args.repeats < 1 or args.calls < 1 or any(h < 1 for h in args.hashes):
    p.error('--repeats, --calls and --hashes must be positive')
  if 'fixed_tokens' in args.regimes and args.tokens < max(args.lengths):
    p.error(f'--tokens {args.tokens} is below the longest length {max(args.lengths)}: the '
            f'fixed_tokens regime needs batch >= 1; raise --tokens or drop that length')
  return args


def variants(args) -> list[Variant]:
  out = []
  for attention in args.attention:
    if attention == 'lsh':
      out += [Variant('lsh', r) for r in args.hashes]
    else:
      out.append(Variant(attention, None))
  return out


def kernel(variant: Variant, *, chunk_len: int, causal: bool):
  """`f(q, k, v, rng) -> [B, L, N, H]` for the variant (LSH ignores k: query/keys are shared)."""
  if variant.attention == 'full':
    return lambda q, k, v, rng: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  if variant.attention == 'cudnn':
    bf16 = lambda x: x.astype(jnp.bfloat16)
    return lambda q, k, v, rng: jax.nn.dot_product_attention(
        bf16(q), bf16(k), bf16(v), is_causal=causal, implementation='cudnn').astype(q.dtype)
  if variant.attention == 'local':
    return lambda q, k, v, rng: local_attention(q, k, v, chunk_len=chunk_len, causal=causal)
  return lambda q, k, v, rng: lsh_attention(q, v, rng=rng, n_hashes=variant.n_hashes,
                                            chunk_len=chunk_len, causal=causal)


def forward_backward(f, variant: Variant):
  """`g(q, k, v, rng, cotangent) -> (out, input gradients)` (the output is kept live)."""
  def g(q, k, v, rng, cotangent):
    if variant.attention == 'lsh':
      out, vjp = jax.vjp(lambda q, v: f(q, None, v, rng), q, v)
    else:
      out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, rng), q, k, v)
    return out, vjp(cotangent)
  return g


def flops(variant: Variant, *, batch: int, length: int, heads: int, head_dim: int,
          chunk_len: int) -> int:
  """Forward+backward FLOPs, 12 * R * B * L * N * H * K (the issue's count)."""
  chunk = min(chunk_len, length)
  keys = length if variant.attention in ('full', 'cudnn') else chunk * (2 if chunk < length else 1)
  return 12 * (variant.n_hashes or 1) * batch * length * heads * head_dim * keys


def compiler_options() -> dict[str, Any] | None:
  """The trainer's XLA options (`reformer_jax.train.backend_options`: on CPU, no YNNPACK
  fusions), so each kernel is timed as a training step runs it."""
  from reformer_jax.train import backend_options  # pylint: disable=import-outside-toplevel
  return backend_options() or None


def chunk_matmuls(*, batch: int, chunk_len: int, head_dim: int):
  """The six batched matmuls of LSH forward+backward, alone: `(call, flops)`.

  `batch` chunks of `chunk_len` queries against windows of `2 * chunk_len` keys (a chunk and the
  one before it), `head_dim` wide: the logits `q k^T` and output `p v` of the forward pass and
  `d_out v^T`, `d_logits k`, `d_logits^T q`, `p^T d_out` of the backward pass, the shapes and
  FLOPs (`12 * batch * C * 2C * H`) of the kernel's own matmuls. What XLA reaches on these
  is the ceiling of the XLA chunk step's `flops_fraction` on this machine (not of the CPU
  chunk kernel's, which multiplies each chunk in registers and cache itself).
  """
  keys = jax.random.split(jax.random.PRNGKey(7), 4)
  q, d_out = (jax.random.normal(k, (batch, chunk_len, head_dim)) for k in keys[:2])
  k, v = (jax.random.normal(k, (batch, 2 * chunk_len, head_dim)) for k in keys[2:])

  def matmuls(q, k, v, d_out):
    dot = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    logits = dot('gqh,gkh->gqk', q, k)
    out = dot('gqk,gkh->gqh', logits, v)
    d_logits = dot('gqh,gkh->gqk', d_out, v)
    return (out, dot('gqk,gkh->gqh', d_logits, k), dot('gqk,gqh->gkh', d_logits, q),
            dot('gqk,gqh->gkh', logits, d_out))
  compiled = jax.jit(matmuls, compiler_options=compiler_options()).lower(q, k, v, d_out).compile()
  return (lambda: compiled(q, k, v, d_out)), 12 * batch * chunk_len * 2 * chunk_len * head_dim


def _compile(fn, *shapes):
  start = time.perf_counter()
  compiled = jax.jit(fn, compiler_options=compiler_options()).lower(*shapes).compile()
  return compiled, time.perf_counter() - start


def prepare(args, length: int, batch: int, regime: str) -> list[tuple[dict, list]]:
  """Compiles every variant at one (length, batch) and checks its memory.

  Returns `(point, fns)` pairs; `fns` is `[('fwd_s', call), ('fwd_bwd_s', call)]`, or empty for a
  point skipped with a note.
  """
  shape = (batch, length, args.heads, args.head_dim)
  keys = jax.random.split(jax.random.PRNGKey(length), 5)
  q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32) for key in keys[:4])
  rng = keys[4]
  spec = jax.ShapeDtypeStruct(shape, jnp.float32)
  rng_spec = jax.ShapeDtypeStruct(rng.shape, rng.dtype)

  cases = []
  for variant in variants(args):
    point = dict(regime=regime, length=length, batch=batch, attention=variant.attention,
                 n_hashes=variant.n_hashes, fwd_s=None, fwd_bwd_s=None, compile_s=None,
                 compile_fwd_s=None, compiled_bytes=None, compiled_fwd_bytes=None,
                 flops=flops(variant, batch=batch, length=length, heads=args.heads,
                             head_dim=args.head_dim, chunk_len=args.chunk_len),
                 flops_fraction=None, time_per_token_s=None, repeats=0, fwd_samples_s=[],
                 fwd_rounds=[], fwd_bwd_samples_s=[], fwd_bwd_rounds=[], note=None,
                 keeps_freed_memory=host_memory.applied())
    f = kernel(variant, chunk_len=args.chunk_len, causal=args.causal)
    try:
      fwd, point['compile_fwd_s'] = _compile(f, spec, spec, spec, rng_spec)
      fwd_bwd, point['compile_s'] = _compile(forward_backward(f, variant), spec, spec, spec,
                                             rng_spec, spec)
    except Exception as err:  # pylint: disable=broad-except
      first_line = (str(err).splitlines() or [type(err).__name__])[0][:160]
      if common.is_resource_exhausted(err):  # e.g. a GPU compiler's autotuning buffers
        point['note'] = f'skipped: out of memory while compiling ({first_line})'
      elif variant.attention == 'cudnn':
        # No GPU, or a cuDNN without the fused kernel for this shape: a note, not a crash.
        point['note'] = f'cuDNN attention unavailable: {first_line}'
      else:
        raise
      cases.append((point, []))
      print(f'skipped {_label(point)}: {point["note"]}', flush=True)
      continue
    point['compiled_fwd_bytes'] = common.CompiledMemory.of(fwd).peak
    point['compiled_bytes'] = common.CompiledMemory.of(fwd_bwd).peak
    ok, point['note'] = common.fits(max(point['compiled_bytes'], point['compiled_fwd_bytes']),
                                    margin=args.memory_margin, limit=args.max_bytes)
    fns = [('fwd_s', lambda fwd=fwd: fwd(q, k, v, rng)),
           ('fwd_bwd_s', lambda g=fwd_bwd: g(q, k, v, rng, cotangent))] if ok else []
    cases.append((point, fns))
    print(f'compiled {_label(point)}: fwd {point["compile_fwd_s"]:.1f}s, fwd+bwd '
          f'{point["compile_s"]:.1f}s, {point["compiled_bytes"] / common.GIB:.3f} GiB '
          f'{point["note"] or ""}', flush=True)
  return cases


def _label(p) -> str:
  return (f"{p['regime']} L={common.human(p['length'])} B={p['batch']} "
          f"{Variant(p['attention'], p['n_hashes']).label}")


def warm_up(cases: list[tuple[dict, list]], args) -> list[tuple[dict, list]]:
  """Calls every function once (excluded from the samples) and decides how many rounds it is
  timed in: all `--repeats`, or fewer when its warm-up says they would overrun `--budget-s`. A
  point that runs out of memory gets a note and is left out. Returns the live points as
  `(point, [(name, fn, rounds), ...])`."""
  live = []
  for point, fns in cases:
    if not fns:
      continue
    timed = []
    try:
      for name, fn in fns:
        warm = common.time_call(fn)
        timed.append((name, fn, max(1, min(args.repeats,
                                           int(args.budget_s / max(args.calls * warm, 1e-9))))))
    except jax.errors.JaxRuntimeError as err:
      if not common.is_resource_exhausted(err):
        raise
      point['note'] = common.out_of_memory_note(err)
      continue
    live.append((point, timed))
  return live


def time_round(live: list[tuple[dict, list]], r: int, args) -> None:
  """Round `r`: each live function's sample, the fastest of `--calls` back-to-back calls (the
  first calls right after another function pay for that one's traces in the process: right
  after a 16K-token full attention call, gigabytes of temporaries and 27 s on the 2-core CPU,
  LSH-4's forward+backward at 16K took 427 and 804 ms for its next two calls and 132-163 ms from
  the third on), and the round it was taken in."""
  for point, timed in live:
    for name, fn, rounds in timed:
      if r < rounds:
        point[name.replace('_s', '_samples_s')].append(
            min(common.time_call(fn) for _ in range(args.calls)))
        point[name.replace('_s', '_rounds')].append(r)


def warm_references(references: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
  """Calls each reference once (excluded from the samples); returns its empty sample lists."""
  for call in references.values():
    common.block(call())
  return {name: [] for name in references}


def time_references(references: dict[str, Callable[[], Any]],
                    samples: dict[str, list[float]]) -> None:
  """One round of the references: each one's fastest of `REFERENCE_CALLS` back-to-back calls (a
  single call right after a big kernel ran at half the matmul's rate or less on the 2-core CPU,
  which flattered every FLOP/s fraction)."""
  for name, call in references.items():
    samples.setdefault(name, []).append(
        min(common.time_call(call) for _ in range(REFERENCE_CALLS)))


def finish(point: dict[str, Any]) -> None:
  """A point's medians from its samples so far (nothing for a point with none)."""
  if point['fwd_bwd_samples_s']:
    point['fwd_s'] = common.median(point['fwd_samples_s'])
    point['fwd_bwd_s'] = common.median(point['fwd_bwd_samples_s'])
    point['repeats'] = len(point['fwd_bwd_samples_s'])
    point['time_per_token_s'] = point['fwd_bwd_s'] / (point['batch'] * point['length'])


def time_cases(cases: list[tuple[dict, list]], args,
               references: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
  """All of `cases` and the references in this process (`--one-process`): warm-up, then
  `--repeats` rounds, each timing the references and then every function once.

  Interleaving puts all points under the same background load, and each sample's round is
  recorded (`fwd_bwd_rounds`) so `summarize` can compare points within a round.
  Returns each reference's samples (seconds), one per round.
  """
  live = warm_up(cases, args)
  samples = warm_references(references)
  for r in range(args.repeats):
    time_references(references, samples)
    time_round(live, r, args)
    print(f'round {r + 1}/{args.repeats} done', flush=True)
  for point, _ in live:
    finish(point)
  return samples


def _by_round(p: dict[str, Any]) -> dict[int, float]:
  """Round -> forward+backward seconds (files without rounds: sample i was taken in round i)."""
  samples = p.get('fwd_bwd_samples_s') or []
  return dict(zip(p.get('fwd_bwd_rounds') or range(len(samples)), samples))


def summarize(points: list[dict[str, Any]], matmul_rates: Sequence[float],
              hashes: Sequence[int], chunk_rates: Sequence[float] | None = None) -> dict:
  """The issue's targets, from the measured points.

  On a shared machine the load can change several-fold between rounds (each round's matmul
  says by how much), and noise only ever adds time. So each number comes two ways:

  * best: a point's fastest sample against the fastest matmul of the run (`flops_fraction`), or
    against another point's fastest sample (`..._best`): the least-disturbed estimates;
  * paired: ratios within one round, median over rounds (`flops_fraction_paired`, speedups and
    per-token ratios): both sides then ran under similar load.

  `matmul_rates`: FLOP/s of each round's matmul; `chunk_rates`: of each round's chunk matmuls
  (`chunk_matmuls`), whose best over the matmul's best is the ceiling of `flops_fraction` here.
  """
  peak = max(matmul_rates)
  for p in points:
    rounds = _by_round(p)
    p['flops_fraction'] = p['flops'] / min(rounds.values()) / peak if rounds else None
    p['flops_fraction_paired'] = common.median(
        [p['flops'] / t / matmul_rates[r] for r, t in rounds.items() if r < len(matmul_rates)])

  def find(regime, attention, n_hashes, length):
    return next((p for p in points if p['regime'] == regime and p['attention'] == attention
                 and p['n_hashes'] == n_hashes and p['length'] == length and p['fwd_bwd_s']),
                None)

  def paired_ratio(a, b):  # median over shared rounds of a's time / b's time
    ta, tb = _by_round(a), _by_round(b)
    return common.median([ta[r] / tb[r] for r in ta if r in tb])

  def best(p):
    return min(_by_round(p).values())

  summary: dict[str, Any] = {'matmul_flops_per_s': common.median(matmul_rates),
                             'matmul_flops_per_s_range': [min(matmul_rates), peak]}
  paired, best_ratio = {}, {}
  for r in hashes:
    for length in sorted({p['length'] for p in points}):
      full, lsh = find('batch1', 'full', None, length), find('batch1', 'lsh', r, length)
      if full and lsh:
        paired.setdefault(f'lsh-{r}', {})[common.human(length)] = paired_ratio(full, lsh)
        best_ratio.setdefault(f'lsh-{r}', {})[common.human(length)] = best(full) / best(lsh)
  summary['lsh_vs_full_fwd_bwd_speedup_batch1'] = paired  # target: lsh-4 >= 15 at 16K
  summary['lsh_vs_full_fwd_bwd_speedup_batch1_best'] = best_ratio
  flat = {}
  for r in hashes:
    pts = sorted((p for p in points if p['regime'] == 'fixed_tokens' and p['attention'] == 'lsh'
                  and p['n_hashes'] == r and p['time_per_token_s']), key=lambda p: p['length'])
    if len(pts) >= 2:
      # Time per token relative to the shortest length, paired by round (1.0 = as fast).
      tokens = [p['length'] * p['batch'] for p in pts]
      relative = [paired_ratio(p, pts[0]) * tokens[0] / n for p, n in zip(pts, tokens)]
      flat[f'lsh-{r}'] = {
          'lengths': f"{common.human(pts[0]['length'])}..{common.human(pts[-1]['length'])}",
          'per_token_vs_shortest': {common.human(p['length']): x for p, x in zip(pts, relative)
                                    if x is not None},
          'max_over_min_minus_1': common.spread([x for x in relative if x is not None]),
          # The "within +-30%", read against the shortest length.
          'within_30pct_of_shortest': all(0.7 <= x <= 1.3 for x in relative if x is not None),
          'max_over_min_minus_1_best': common.spread([best(p) / n for p, n in zip(pts, tokens)]),
          'max_over_min_minus_1_medians': common.spread([p['time_per_token_s'] for p in pts])}
  summary['lsh_time_per_token_spread_fixed_tokens'] = flat  # target: <= 0.3 (within +-30%)
  for kind in ('flops_fraction', 'flops_fraction_paired'):  # target: >= 0.4
    fractions = [p[kind] for p in points if p['attention'] == 'lsh' and p[kind]]
    summary[f'lsh_{kind}_range'] = [min(fractions), max(fractions)] if fractions else None
    summary[f'lsh_{kind}_median'] = common.median(fractions)
  if chunk_rates:
    # LSH's own matmul shapes alone reach this fraction of the big matmul: the kernel's FLOP/s
    # fraction cannot exceed it; and how close each point comes to it.
    summary['chunk_matmuls_flops_per_s'] = common.median(chunk_rates)
    summary['chunk_matmuls_flops_fraction'] = max(chunk_rates) / peak
    of_chunks = [p['flops'] / min(_by_round(p).values()) / max(chunk_rates) for p in points
                 if p['attention'] == 'lsh' and p['flops_fraction']]
    summary['lsh_flops_fraction_of_chunk_matmuls_median'] = common.median(of_chunks)
    summary['lsh_flops_fraction_of_chunk_matmuls_range'] = (
        [min(of_chunks), max(of_chunks)] if of_chunks else None)
  return summary


def plot(result: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Median forward+backward time per token against length, log-log (paper Figure 5)."""
  plt = common.pyplot()
  regimes = [r for r in REGIMES if any(p['regime'] == r for p in result['points'])]
  fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.8), squeeze=False)
  labels = sorted({(p['attention'], p['n_hashes'] or 0) for p in result['points']},
                  key=lambda a: (ATTENTIONS.index(a[0]), a[1]))
  colors = {label: plt.cm.tab10(i) for i, label in enumerate(labels)}
  for ax, regime in zip(axes[0], regimes):
    for label in labels:
      pts = sorted((p for p in result['points'] if p['regime'] == regime and p['fwd_bwd_s']
                    and (p['attention'], p['n_hashes'] or 0) == label), key=lambda p: p['length'])
      if not pts:
        continue
      name = label[0] if label[0] != 'lsh' else f"lsh, {label[1]} hash{'es' * (label[1] > 1)}"
      ax.plot([p['length'] for p in pts], [p['time_per_token_s'] * 1e6 for p in pts], 'o-',
              color=colors[label], label=name)
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    lengths = sorted({p['length'] for p in result['points']})
    ax.set_xticks(lengths, [common.human(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel('sequence length (tokens)')
    ax.set_ylabel('forward+backward µs per token (median)')
    cfg = result['config']
    what = ('batch 1' if regime == 'batch1' else
            f"batch x length = {common.human(cfg['tokens'])}")
    ax.set_title(f'{what}; {cfg["heads"]} heads x {cfg["head_dim"]}, chunk {cfg["chunk_len"]}'
                 + (', causal' if cfg['causal'] else ''), fontsize=10)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f'Attention time per token — {common.machine_title(result["machine"])}',
               fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _variant_label(p: dict[str, Any]) -> str:
  return Variant(p['attention'], p['n_hashes']).label


def tables(result: dict[str, Any]) -> str:
  """Markdown: median forward+backward µs per token, one table per regime (README Results)."""
  points, cfg = result['points'], result['config']
  labels = [v.label for v in sorted({Variant(p['attention'], p['n_hashes']) for p in points},
                                    key=lambda v: (ATTENTIONS.index(v.attention), v.n_hashes or 0))]
  out = []
  for regime in [r for r in REGIMES if any(p['regime'] == r for p in points)]:
    what = 'batch 1' if regime == 'batch1' else f"batch x length = {common.human(cfg['tokens'])}"
    rows = []
    for length in sorted({p['length'] for p in points if p['regime'] == regime}):
      at = {_variant_label(p): p for p in points if p['regime'] == regime and p['length'] == length}
      row = {'length': common.human(length), 'batch': next(iter(at.values()))['batch']}
      for label in labels:
        p = at.get(label)
        row[label] = (None if p is None or not p['time_per_token_s'] else
                      f"{p['time_per_token_s'] * 1e6:.3g}")  # 3 digits: GPU values are ~0.05
      rows.append(row)
    out.append(f'{what}: median forward+backward µs per token (- = skipped, see notes)\n\n'
               + common.markdown_table(rows, ['length', 'batch', *labels]))
  return '\n\n'.join(out)


def profile(args: argparse.Namespace) -> dict[str, Any]:
  """Where LSH forward+backward spends its time, by HLO op and op category."""
  result: dict[str, Any] = {'machine': common.machine_info(), 'config': {
      k: v for k, v in vars(args).items() if k not in ('out', 'wandb')}, 'profiles': []}
  for length in args.lengths:
    for r in args.hashes:
      variant = Variant('lsh', r)
      shape = (1, length, args.heads, args.head_dim)
      keys = jax.random.split(jax.random.PRNGKey(length), 4)
      q, v, cotangent = (jax.random.normal(key, shape, jnp.float32) for key in keys[:3])
      f = forward_backward(kernel(variant, chunk_len=args.chunk_len, causal=args.causal), variant)
      compiled, _ = _compile(f, q, q, v, keys[3], cotangent)
      rows = common.op_profile(compiled, lambda: compiled(q, q, v, keys[3], cotangent))
      print(f'lsh-{r} L={common.human(length)} batch 1, forward+backward:')
      result['profiles'].append({'length': length, 'batch': 1, 'n_hashes': r,
                                 **common.profile_summary(rows)})
  path = args.out.with_name(args.out.stem + '_profile.json')
  common.write_json(path, result)
  print(f'wrote {path}')
  return result


def replot(args: argparse.Namespace) -> dict[str, Any]:
  result = json.loads(args.out.read_text(encoding='utf-8'))
  result['summary'] = summarize(result['points'], result['matmul']['samples_flops_per_s'],
                                result['config']['hashes'],
                                result.get('chunk_matmuls', {}).get('samples_flops_per_s'))
  common.write_json(args.out, result)
  print(tables(result))
  print(f"wrote {plot(result, args.out.with_suffix('.png'))}")
  return result


def prepare_all(args) -> tuple[list, list]:
  """`prepare` at every length and regime of `args`: `(cases, same)`, where `same` lists
  `(regime, cases)` for a regime whose configuration (length and batch) an earlier regime's
  cases already measure (with `--tokens` = length both regimes are batch 1)."""
  cases, same = [], []
  for length in sorted(args.lengths):
    first = None
    for regime in args.regimes:
      batch = args.tokens // length if regime == 'fixed_tokens' else 1
      if first and first[0][0]['batch'] == batch:
        same.append((regime, first))
      else:
        first = prepare(args, length, batch, regime)
        cases += first
  return cases, same


def all_points(cases: list, same: list) -> list[dict[str, Any]]:
  return [p for p, _ in cases] + [dict(p, regime=regime) for regime, first in same
                                   for p, _ in first]


def references(args) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
  """The references timed in every round: a `--matmul-size` float32 matmul and LSH's chunk
  matmuls at `--tokens` tokens (one hash round, all heads). Returns the calls and what they
  are (`{'matmul_flops', 'chunks', 'chunk_flops'}`)."""
  size = args.matmul_size
  a, b = (jax.random.normal(jax.random.PRNGKey(i), (size, size), jnp.float32) for i in (0, 1))
  matmul = jax.jit(jnp.matmul, compiler_options=compiler_options()).lower(a, b).compile()
  chunks = args.tokens // args.chunk_len * args.heads
  chunk_call, chunk_flops = chunk_matmuls(batch=chunks, chunk_len=args.chunk_len,
                                          head_dim=args.head_dim)
  return ({'matmul': lambda: matmul(a, b), 'chunk_matmuls': chunk_call},
          {'matmul_flops': 2 * size ** 3, 'chunks': chunks, 'chunk_flops': chunk_flops})


REFERENCE = 'reference'  # the worker process that times the references
QUADRATIC = ('full', 'cudnn')  # attention kinds whose memory grows with the length squared


def worker(init: dict[str, Any]) -> None:
  """A worker process (`--worker`): times one attention kind's points, or the references, one
  round per request of the parent process (`run_workers`).

  Protocol, one JSON object per line: the parent's first line is `{"args": {...}, "group":
  KIND}`, later lines `{"round": r}` or `{"exit": true}`; after its warm-up and after each round
  the worker answers on its original stdout (everything it prints goes to stderr) with
  `{"points": [...]}` (its points, samples so far) or, for the references, `{"references":
  {name: [seconds, ...]}, "info": {...}}`.
  """
  answer = os.fdopen(os.dup(1), 'w', buffering=1, encoding='utf-8')
  os.dup2(2, 1)  # prints, warnings and compiler output go to stderr
  args = argparse.Namespace(**init['args'])
  group = init['group']
  if group == REFERENCE:
    calls, info = references(args)
    samples = warm_references(calls)
    reply = lambda: {'references': samples, 'info': info}
  else:
    args.attention = [group]
    cases, same = prepare_all(args)
    live = warm_up(cases, args)
    reply = lambda: {'points': all_points(cases, same)}
  # Before each answer, the heap memory this process freed goes back to the system (the next
  # round's first call of each function faults it in again; its sample is the fastest of
  # --calls): otherwise each worker keeps its peak resident while the others run, and they add up.
  rss.trim_allocator()
  answer.write(json.dumps(reply()) + '\n')
  for line in sys.stdin:
    request = json.loads(line)
    if request.get('exit'):
      return
    r = request['round']
    if group == REFERENCE:
      time_references(calls, samples)
    else:
      time_round(live, r, args)
      for point, _ in live:
        finish(point)
    rss.trim_allocator()
    answer.write(json.dumps(reply()) + '\n')


class Worker:
  """A `--worker` process for one attention kind (or the references), driven by `run_workers`."""

  def __init__(self, group: str, args: argparse.Namespace):
    self.group = group
    # Full attention's gigabyte buffers are mapped afresh every call with kept memory too (its
    # heap is trimmed past glibc's 2 GiB threshold); kept, its resident memory stayed at its
    # largest point's peak (14.7 GiB here, beside the other workers': the kernel killed it).
    env = common.child_env(**({host_memory.ENV: '0'} if group in QUADRATIC else {}))
    self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, '-m', 'experiments.attention_timing', '--worker'], cwd=common.REPO_ROOT,
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding='utf-8')
    init_args = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    self.last = self._send({'args': init_args, 'group': group})
    if self.last is None:
      raise RuntimeError(f'the {group} worker process exited with code {self.proc.wait()} '
                         f'before it was ready (its messages are above)')

  def _send(self, request: dict[str, Any]) -> dict[str, Any] | None:
    """Sends one request; the answer, or None if the process has exited."""
    try:
      self.proc.stdin.write(json.dumps(request) + '\n')
      self.proc.stdin.flush()
    except (BrokenPipeError, OSError):
      return None
    line = self.proc.stdout.readline()
    return json.loads(line) if line else None

  def round(self, r: int) -> bool:
    """Round `r` in the worker; False (its earlier rounds kept) if the process has exited."""
    answer = self._send({'round': r})
    if answer is None:
      return False
    self.last = answer
    return True

  def close(self) -> None:
    if self.proc.poll() is None:
      self._send({'exit': True})
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


def run_workers(args) -> tuple[list[dict[str, Any]], dict[str, list[float]], dict[str, Any]]:
  """Times each attention kind in its own process, the references in another, round-robin.

  A process that has run full attention (gigabytes of temporaries) stays slower on LSH's larger
  points long after it: on the 2-core CPU LSH-4 at 16K tokens took 223 ms in a run that timed
  full and local attention in the same process and 143 ms in one that timed LSH alone
  (`attention_timing_cpu_lsh_only.json`). So every kind gets its own `--worker` process (as
  `experiments.peers` runs each implementation in its own), started one after another (each
  compiles and checks its memory with the earlier ones resident; full attention's last, and
  without kept freed memory: `Worker`), and round r asks each process in turn for its round r:
  one process runs at a time, and all see the same background load.
  Returns the points, the references' samples and what the references are.
  """
  workers: list[Worker] = []
  try:
    # The quadratic kinds start last: their memory checks then see what the others hold.
    for group in [REFERENCE, *sorted(args.attention, key=lambda a: a in QUADRATIC)]:
      workers.append(Worker(group, args))
    dead: dict[str, str] = {}
    start = time.perf_counter()
    for r in range(args.repeats):
      for w in workers:
        if w.group not in dead and not w.round(r):
          code = w.proc.wait()
          if w.group == REFERENCE:
            raise RuntimeError(f'the reference worker process exited with code {code} in round '
                               f'{r + 1} (its messages are above)')
          dead[w.group] = (f'its worker process exited with code {code} in round {r + 1} '
                           f'(likely out of memory if -9); the earlier rounds are kept')
          print(f'{w.group}: {dead[w.group]}', flush=True)
      elapsed = time.perf_counter() - start
      print(f'round {r + 1}/{args.repeats} done, {elapsed:.0f} s; about '
            f'{elapsed / (r + 1) * (args.repeats - r - 1):.0f} s to go', flush=True)
  finally:
    for w in workers:
      w.close()
  points = []
  for w in workers[1:]:
    for point in w.last['points']:
      if w.group in dead and point['note'] is None:
        point['note'] = dead[w.group]
      points.append(point)
  return points, workers[0].last['references'], workers[0].last['info']


def run(args: argparse.Namespace) -> dict[str, Any]:
  config = {k: v for k, v in vars(args).items() if k not in ('out', 'wandb')}
  config['compiler_options'] = compiler_options()
  probe = jnp.zeros((1, 1, args.chunk_len, args.head_dim), jnp.float32)
  config['chunk_kernel'] = ('cpu' if jax.default_backend() == 'cpu' and cpu_kernel.applies(
      probe, probe, args.chunk_len, 1, 0) else 'xla')  # LSH's chunk step: compiled kernel or XLA
  result: dict[str, Any] = {'machine': common.machine_info(), 'config': config}
  if args.one_process:
    cases, same = prepare_all(args)
    calls, info = references(args)
    samples = time_cases(cases, args, calls)
    points = all_points(cases, same)
  else:
    points, samples, info = run_workers(args)
  order = {r: i for i, r in enumerate(REGIMES)}
  result['points'] = sorted(points, key=lambda p: (
      order[p['regime']], p['length'], ATTENTIONS.index(p['attention']), p['n_hashes'] or 0))
  rates = [info['matmul_flops'] / t for t in samples['matmul']]
  chunk_rates = [info['chunk_flops'] / t for t in samples['chunk_matmuls']]
  result['matmul_flops_per_s'] = common.median(rates)
  result['matmul'] = {'size': args.matmul_size, 'samples_flops_per_s': rates}
  result['chunk_matmuls'] = {'chunks': info['chunks'], 'chunk_len': args.chunk_len,
                             'head_dim': args.head_dim, 'samples_flops_per_s': chunk_rates}
  result['summary'] = summarize(result['points'], rates, args.hashes, chunk_rates)
  common.write_json(args.out, result)
  png = plot(result, args.out.with_suffix('.png'))
  print(common.markdown_table(result['points'], TABLE_COLUMNS))
  print(tables(result))
  print('summary:', json.dumps(result['summary'], indent=1))
  print(f'wrote {args.out} and {png}')
  common.log_to_wandb(args.wandb, job='attention_timing', config=config, rows=result['points'],
                      columns=TABLE_COLUMNS, images={'plot': png},
                      summary=_flat(result['summary']))
  return result


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}/'))
    else:
      out[prefix + k] = v
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  if list(sys.argv[1:] if argv is None else argv) == ['--worker']:
    host_memory.keep_freed_memory()
    return worker(json.loads(sys.stdin.readline()))
  args = parse_args(argv)
  host_memory.keep_freed_memory()  # before the first computation
  if args.profile:
    return profile(args)
  return replot(args) if args.replot else run(args)


if __name__ == '__main__':
  main(sys.argv[1:])
