"""One Reformer implementation's training step, timed and measured in this process.

    python -m experiments.peer_steps '{"implementation": "transformers", "layers": 6, ...}'

The child process of `experiments.peers`, which starts one per implementation and repeat so that
each process's peak resident set is its own. Importing this module imports neither JAX nor
PyTorch: a process loads only the framework of the implementation it runs, so a PyTorch peer's
memory holds no idle JAX runtime (and `reformer_jax`'s no PyTorch).

Implementations, each an LSH-attention, reversible, causal language model built from the same
spec (every layer LSH with `hashes` rounds, chunks of `chunk` tokens seeing one chunk back, axial
positions of shape `axial_shape` and widths `axial_dims`, GELU feed-forward of width `d_ff`,
chunked over `ff_chunk` tokens when nonzero, dropout 0, float32), trained by next-token
cross-entropy and AdamW:

    reformer_jax      reformer_jax.models.ReformerLM, one jitted step (optax.adamw), parameters
                      and optimizer state donated; a fresh hash key per step (fold_in(key, step));
                      ModelConfig's defaults for the rest (keep_last 1: the last feed-forward
                      keeps its forward activations, the others are rebuilt in the backward pass)
    transformers      Hugging Face `ReformerModelWithLMHead` (attn_layers ['lsh'] * layers)
    reformer_pytorch  lucidrains' `reformer_pytorch.ReformerLM` (causal=True), its axial
                      embedding replaced by a concatenated one of the same shape and widths

Known differences that remain (parameter counts are reported so a reader can see their size):
Hugging Face's LM head reads the two reversible streams concatenated (a LayerNorm and a
projection of width 2 * d_model), where the others average them; reformer_pytorch's attention
output projection has a bias; reformer_pytorch always uses `length / chunk` buckets (the others
use `buckets`) and its GELU is the tanh approximation only where PyTorch's is (JAX uses tanh,
Hugging Face 'gelu' the exact erf form).

Prints one line `PEER_RESULT {json}` with:
  params, runtime_rss_bytes (after importing and starting the framework), built_rss_bytes (model,
  optimizer and tokens in place), compile_s (reformer_jax: jit lowering + XLA compile; None for
  PyTorch), warmup_s (the excluded first steps), step_samples_s (the timed steps), loss,
  peak_rss_bytes (largest resident set during the timed steps: VmHWM reset just before them and
  a 2 ms poll; before the warm-up, `malloc_trim(0)` hands back to the system what compilation
  freed but glibc kept, alike for every implementation), peak_rss_with_warmup_bytes (VmHWM over
  the whole process, compile and warm-up included), page_faults_per_step (minor faults during
  the timed steps), keeps_freed_memory (`reformer_jax.host_memory.keep_freed_memory` applied:
  it is, for every implementation alike, where glibc allows; for reformer_jax it also runs the
  CPU steps inline, as the trainer does), versions; or note (why it did not run: not installed,
  out of memory).
"""

from __future__ import annotations

# Frameworks are imported inside functions on purpose (see above).
# pylint: disable=import-outside-toplevel,unused-import

import gc
import json
import math
import os
import resource
import sys
import time
from typing import Any, Callable

from experiments import rss

RESULT_PREFIX = 'PEER_RESULT '
IMPLEMENTATIONS = ('reformer_jax', 'transformers', 'reformer_pytorch')
PACKAGES = {'reformer_jax': ('jax', 'flax', 'optax'), 'transformers': ('torch', 'transformers'),
            'reformer_pytorch': ('torch', 'reformer-pytorch', 'axial-positional-embedding')}
INSTALL_HINT = "pip install -e '.[peers]' (see experiments/peers.py)"


class Built:
  """A ready training step: `step()` runs one update to completion and returns the loss."""

  def __init__(self, params: int, step: Callable[[], float], compile_s: float | None = None,
               compiled: Any = None):
    self.params, self.step, self.compile_s = params, step, compile_s
    self.compiled = compiled  # reformer_jax: the compiled step (for `experiments.peers --profile`)


# ---------------------------------------------------------------------------------------------
# reformer_jax

def start_reformer_jax(spec: dict[str, Any]) -> None:
  import jax
  import optax
  from reformer_jax import host_memory, models
  host_memory.keep_freed_memory()  # again, now that JAX is imported: CPU steps run inline
  jax.devices()  # starts the CPU client (its thread pools belong to the runtime)


def build_reformer_jax(spec: dict[str, Any]) -> Built:
  import jax
  import jax.numpy as jnp
  import optax
  from reformer_jax.model_config import ModelConfig
  from reformer_jax.models import ReformerLM
  from reformer_jax.train import backend_options

  buckets = spec['buckets']
  cfg = ModelConfig(
      vocab_size=spec['vocab'], d_model=spec['d_model'], d_ff=spec['d_ff'],
      n_heads=spec['heads'], n_layers=spec['layers'], attention_types=('lsh',),
      max_len=spec['length'], chunk_len=spec['chunk'], n_chunks_before=1, n_chunks_after=0,
      n_hashes=spec['hashes'], n_buckets=tuple(buckets) if isinstance(buckets, list) else buckets,
      reversible=True, ff_chunk_len=spec['ff_chunk'], dropout=0.0, pos_embedding='axial',
      axial_shape=tuple(spec['axial_shape']), axial_dims=tuple(spec['axial_dims']),
      dtype='float32', param_dtype='float32')
  model = ReformerLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(spec['seed']), (spec['batch'], spec['length']),
                              1, spec['vocab'])
  # Parameter shapes do not depend on the length: initialize on the first chunk.
  params = jax.jit(lambda key: model.init(key, tokens[:, :spec['chunk']],
                                          rng=jax.random.PRNGKey(1))['params'])(
                                              jax.random.PRNGKey(spec['seed']))
  tx = optax.adamw(spec['lr'], weight_decay=spec['weight_decay'])
  opt_state = tx.init(params)
  hash_key = jax.random.PRNGKey(spec['seed'] + 1)

  def train_step(params, opt_state, tokens, step):
    def loss_fn(p):
      logits = model.apply({'params': p}, tokens, rng=jax.random.fold_in(hash_key, step),
                           train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  # The trainer's XLA options (reformer_jax.train.backend_options: on CPU, no YNNPACK fusions).
  compiled = jax.jit(train_step, donate_argnums=(0, 1),
                     compiler_options=backend_options() or None).lower(
      params, opt_state, tokens, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - start
  state = {'params': params, 'opt_state': opt_state, 'step': 0}
  del params, opt_state

  def step() -> float:
    state['params'], state['opt_state'], loss = compiled(
        state['params'], state['opt_state'], tokens, jnp.int32(state['step']))
    state['step'] += 1
    return float(loss)  # waits for the step

  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  return Built(int(n_params), step, compile_s, compiled)


# ---------------------------------------------------------------------------------------------
# PyTorch peers

def start_torch(spec: dict[str, Any]) -> None:
  import torch
  torch.set_num_threads(spec['threads'])
  torch.manual_seed(spec['seed'])
  if spec['implementation'] == 'transformers':
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import ReformerModelWithLMHead
  else:
    import reformer_pytorch
    import axial_positional_embedding
  torch.ones(8) @ torch.ones(8)  # starts the intra-op thread pool


def _transformers_model(spec: dict[str, Any]):
  from transformers import ReformerConfig, ReformerModelWithLMHead
  config = ReformerConfig(
      vocab_size=spec['vocab'], hidden_size=spec['d_model'], feed_forward_size=spec['d_ff'],
      num_attention_heads=spec['heads'], attention_head_size=spec['d_model'] // spec['heads'],
      attn_layers=['lsh'] * spec['layers'], num_hashes=spec['hashes'],
      lsh_attn_chunk_length=spec['chunk'], lsh_num_chunks_before=1, lsh_num_chunks_after=0,
      num_buckets=spec['buckets'], is_decoder=True, use_cache=False,
      max_position_embeddings=spec['length'], axial_pos_embds=True,
      axial_pos_shape=tuple(spec['axial_shape']), axial_pos_embds_dim=tuple(spec['axial_dims']),
      chunk_size_feed_forward=spec['ff_chunk'], chunk_size_lm_head=0, hidden_act='gelu',
      hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
      local_attention_probs_dropout_prob=0.0, tie_word_embeddings=False, pad_token_id=0,
      eos_token_id=None)
  model = ReformerModelWithLMHead(config)
  return model, lambda tokens: model(input_ids=tokens).logits


def _reformer_pytorch_model(spec: dict[str, Any]):
  from axial_positional_embedding import AxialPositionalEmbedding
  from reformer_pytorch import ReformerLM
  if spec['d_ff'] % spec['d_model']:
    raise ValueError(f"reformer_pytorch sets the feed-forward width as a multiple of d_model: "
                     f"d_ff {spec['d_ff']} is not a multiple of d_model {spec['d_model']}")
  length, ff_chunk = spec['length'], spec['ff_chunk']
  model = ReformerLM(
      num_tokens=spec['vocab'], dim=spec['d_model'], depth=spec['layers'], max_seq_len=length,
      heads=spec['heads'], dim_head=spec['d_model'] // spec['heads'], bucket_size=spec['chunk'],
      n_hashes=spec['hashes'], causal=True, ff_chunks=length // ff_chunk if ff_chunk else 1,
      attn_chunks=1, ff_mult=spec['d_ff'] // spec['d_model'], lsh_dropout=0.0, ff_dropout=0.0,
      post_attn_dropout=0.0, layer_dropout=0.0, weight_tie=False, reverse_thres=0,
      full_attn_thres=0, axial_position_emb=True, axial_position_shape=tuple(spec['axial_shape']))
  # Its default sums one d_model-wide table per axis; reformer_jax and Hugging Face concatenate
  # tables of widths `axial_dims`. Use the same here (same parameters, same work).
  model.pos_emb = AxialPositionalEmbedding(spec['d_model'], tuple(spec['axial_shape']),
                                           axial_dims=tuple(spec['axial_dims']))
  return model, model


def build_torch(spec: dict[str, Any]) -> Built:
  import torch
  import torch.nn.functional as F

  if spec['implementation'] == 'transformers':
    model, forward = _transformers_model(spec)
  else:
    model, forward = _reformer_pytorch_model(spec)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=spec['lr'],
                                weight_decay=spec['weight_decay'])
  generator = torch.Generator().manual_seed(spec['seed'])
  tokens = torch.randint(1, spec['vocab'], (spec['batch'], spec['length']), generator=generator)
  vocab = spec['vocab']

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    logits = forward(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    return loss.item()

  return Built(sum(p.numel() for p in model.parameters()), step)


STARTERS = {'reformer_jax': start_reformer_jax, 'transformers': start_torch,
            'reformer_pytorch': start_torch}
BUILDERS = {'reformer_jax': build_reformer_jax, 'transformers': build_torch,
            'reformer_pytorch': build_torch}


# ---------------------------------------------------------------------------------------------
# Measuring.

def versions(implementation: str) -> dict[str, str | None]:
  """Installed versions of the packages an implementation runs on (None: not installed)."""
  from importlib import metadata
  out = {}
  for name in PACKAGES[implementation]:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
  start = time.perf_counter()
  loss = fn()
  return time.perf_counter() - start, loss


def _is_out_of_memory(err: BaseException) -> bool:
  text = str(err)
  return (isinstance(err, MemoryError) or 'RESOURCE_EXHAUSTED' in text
          or "can't allocate memory" in text or 'DefaultCPUAllocator' in text)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
  """Builds `spec['implementation']`, runs `warmup` steps, then times `steps` steps."""
  implementation = spec['implementation']
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'unknown implementation {implementation!r}; choose from {IMPLEMENTATIONS}')
  if spec['steps'] < 1:
    raise ValueError(f"steps must be >= 1, got {spec['steps']}")
  out: dict[str, Any] = {'implementation': implementation, 'versions': versions(implementation)}
  try:
    STARTERS[implementation](spec)
  except ImportError as err:
    out['note'] = f'skipped: {implementation} is not importable ({err}); install it: {INSTALL_HINT}'
    return out
  out['runtime_rss_bytes'] = rss.proc_status('VmRSS')
  try:
    built = BUILDERS[implementation](spec)
    out.update(params=built.params, compile_s=built.compile_s)
    gc.collect()
    out['built_rss_bytes'] = rss.proc_status('VmRSS')
    out['trimmed'] = rss.trim_allocator()
    warmup = [_timed(built.step) for _ in range(spec['warmup'])]
    gc.collect()
    out['peak_rss_with_warmup_bytes'] = rss.proc_status('VmHWM')
    reset = rss.reset_peak_rss()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with rss.RssSampler() as sampler:
      timed = [_timed(built.step) for _ in range(spec['steps'])]
    out['page_faults_per_step'] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / spec['steps']
    hwm = rss.proc_status('VmHWM') if reset else 0
  except Exception as err:  # pylint: disable=broad-except
    if not _is_out_of_memory(err):
      raise
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    out['note'] = f'skipped: out of memory ({first[:200]})'
    return out
  out['peak_rss_with_warmup_bytes'] = max(out['peak_rss_with_warmup_bytes'], hwm, sampler.peak)
  losses = [loss for _, loss in warmup + timed]
  out.update(warmup_s=[t for t, _ in warmup], step_samples_s=[t for t, _ in timed],
             loss=losses[-1], first_loss=losses[0], peak_rss_bytes=max(hwm, sampler.peak),
             peak_rss_hwm_bytes=hwm if reset else None, peak_rss_sampled_bytes=sampler.peak)
  if not all(math.isfinite(loss) for loss in losses):
    out['note'] = f'non-finite loss: {losses}'
  return out


def pin_threads(threads: int) -> list[int]:
  """Restricts this process to its first `threads` allowed cores (before JAX or PyTorch start:
  XLA sizes its thread pool from the affinity mask, PyTorch gets `set_num_threads`)."""
  allowed = sorted(os.sched_getaffinity(0))
  if not 1 <= threads <= len(allowed):
    raise ValueError(f'threads must be between 1 and the {len(allowed)} cores allowed, got '
                     f'{threads}')
  cores = allowed[:threads]
  os.sched_setaffinity(0, cores)
  return cores


def main(argv: list[str]) -> None:
  if len(argv) != 1:
    raise SystemExit('usage: python -m experiments.peer_steps SPEC_JSON (run by experiments.peers)')
  spec = json.loads(argv[0])
  cores = pin_threads(spec['threads'])
  from reformer_jax import host_memory  # pylint: disable=import-outside-toplevel
  kept = host_memory.keep_freed_memory()  # every implementation alike
  result = measure(spec)
  result['keeps_freed_memory'] = kept
  result['cores'] = cores
  print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
