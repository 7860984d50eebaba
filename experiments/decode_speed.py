"""Decoding speed: cached incremental decoding vs recomputing the whole context per token.

    python -m experiments.decode_speed --quick        # 256 and 1K contexts, a few minutes on CPU
    python -m experiments.decode_speed                # 256, 512, 1K, 2K

For each context length C and attention type, a `ReformerLM` (`--d-model`, `--layers`, ...) is
given a C-token prompt and then produces `--new-tokens` T greedy tokens two ways:

* `cached`: `reformer_jax.decode.decode_step` T times from a cache prefilled with the prompt
  (one jitted `lax.fori_loop`; the prefill is not timed);
* `recomputed`: what decoding without a cache costs per token: one `ReformerLM.apply` over the
  C-token context (the last position's logits give the next token). Its time is the same for
  each of the T tokens to within the growth from C to C + T, so tokens/s = B / time(one apply).

Both are compiled first (compile time reported apart) and warmed up; the median of `--repeats`
timed runs is kept. Writes `--out` (JSON) and a PNG of tokens/s against context next to it:

    {"machine": {...}, "config": {...},
     "points": [{"attention", "context", "batch", "new_tokens", "cached_tokens_per_s",
                 "recomputed_tokens_per_s", "speedup", "cached_compile_s",
                 "recomputed_compile_s"}, ...]}
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from experiments import common
from reformer_jax import decode, host_memory
from reformer_jax.model_config import ModelConfig
from reformer_jax.models import ReformerLM

DEFAULT_OUT = common.REPO_ROOT / 'experiments' / 'results' / 'decode_speed_cpu.json'


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--contexts', nargs='+', default=['256', '512', '1K', '2K'],
                 help='prompt lengths (multiples of --chunk-len)')
  p.add_argument('--quick', action='store_true', help='contexts 256 and 1K only')
  p.add_argument('--attention', nargs='+', default=['lsh', 'full', 'local'],
                 choices=['lsh', 'full', 'local'])
  p.add_argument('--new-tokens', type=int, default=32, help='T, tokens produced per timing')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--d-model', type=int, default=256)
  p.add_argument('--d-ff', type=int, default=512)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--layers', type=int, default=2)
  p.add_argument('--chunk-len', type=int, default=64)
  p.add_argument('--vocab', type=int, default=512)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--out', default=str(DEFAULT_OUT))
  args = p.parse_args(argv)
  args.contexts = [256, 1024] if args.quick else common.size_list(args.contexts)
  return args


def _model_config(args, attention: str, context: int) -> ModelConfig:
  max_len = -(-(context + args.new_tokens) // args.chunk_len) * args.chunk_len
  return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, d_ff=args.d_ff,
                     n_heads=args.heads, n_layers=args.layers, attention_types=(attention,),
                     max_len=max_len, chunk_len=args.chunk_len, hash_seed=0)


def _median_time(fn, repeats: int) -> float:
  common.block(fn())  # warm-up
  return common.median([common.time_call(fn) for _ in range(repeats)])


def measure(args, attention: str, context: int) -> dict[str, Any]:
  cfg = _model_config(args, attention, context)
  prompt = jax.random.randint(jax.random.PRNGKey(0), (args.batch, context), 2, args.vocab)
  params = jax.jit(lambda t: ReformerLM(cfg).init(jax.random.PRNGKey(1), t))(prompt)['params']

  @jax.jit
  def cached(params, logits, cache):
    def body(_, carry):
      logits, cache = carry
      return decode.decode_step(cfg, params, cache, jnp.argmax(logits, -1).astype(jnp.int32))
    return jax.lax.fori_loop(0, args.new_tokens, body, (logits, cache))[0]

  recompute = jax.jit(lambda params, tokens: jnp.argmax(
      ReformerLM(cfg).apply({'params': params}, tokens)[:, -1], -1))

  logits, cache = jax.jit(functools.partial(decode.prefill, cfg))(params, prompt)
  start = time.perf_counter()
  cached_c = cached.lower(params, logits, cache).compile()
  cached_compile = time.perf_counter() - start
  start = time.perf_counter()
  recompute_c = recompute.lower(params, prompt).compile()
  recompute_compile = time.perf_counter() - start

  cached_s = _median_time(lambda: cached_c(params, logits, cache), args.repeats)
  recompute_s = _median_time(lambda: recompute_c(params, prompt), args.repeats)
  cached_tps = args.batch * args.new_tokens / cached_s
  recompute_tps = args.batch / recompute_s
  return {'attention': attention, 'context': context, 'batch': args.batch,
          'new_tokens': args.new_tokens, 'cached_tokens_per_s': cached_tps,
          'recomputed_tokens_per_s': recompute_tps, 'speedup': cached_tps / recompute_tps,
          'cached_compile_s': cached_compile, 'recomputed_compile_s': recompute_compile}


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for attention in sorted({p['attention'] for p in result['points']}):
    pts = [p for p in result['points'] if p['attention'] == attention]
    xs = [p['context'] for p in pts]
    line, = ax.plot(xs, [p['cached_tokens_per_s'] for p in pts], 'o-', label=f'{attention} cached')
    ax.plot(xs, [p['recomputed_tokens_per_s'] for p in pts], 'x--', color=line.get_color(),
            label=f'{attention} recomputed')
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('context (tokens)')
  ax.set_ylabel('tokens / s')
  ax.set_title(common.machine_title(result['machine']), fontsize=8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  host_memory.keep_freed_memory()  # before the first computation
  config = {k: v for k, v in vars(args).items() if k != 'out'}
  result = {'machine': common.machine_info(), 'config': config, 'points': []}
  points = result['points']
  for attention in args.attention:
    for context in args.contexts:
      points.append(measure(args, attention, context))
      print(f"{attention:5s} C={context:5d}: cached {points[-1]['cached_tokens_per_s']:9.1f} "
            f"tok/s, recomputed {points[-1]['recomputed_tokens_per_s']:8.1f} tok/s, "
            f"{points[-1]['speedup']:.1f}x", flush=True)
      out = common.write_json(args.out, result)  # after every point: an interrupted run keeps them
  plot(result, out.with_suffix('.png'))
  print(common.markdown_table(points, ['attention', 'context', 'cached_tokens_per_s',
                                       'recomputed_tokens_per_s', 'speedup']))
  return result


if __name__ == '__main__':
  main(sys.argv[1:])
