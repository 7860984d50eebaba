"""Reversibility must keep a training step's memory flat in depth; the ordinary stack grows."""

import jax
import jax.numpy as jnp
import optax
import pytest

from reformer_jax.model_config import ModelConfig
from reformer_jax.models import ReformerLM


def step_peak_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
  """Compiled peak memory (arguments + outputs + temporaries) of one SGD training step."""
  model = ReformerLM(cfg)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, length), jnp.int32),
                         rng=jax.random.PRNGKey(1))['params'])

  def train_step(params, tokens, rng):
    def loss(p):
      logits = model.apply({'params': p}, tokens, rng=rng, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  compiled = jax.jit(train_step, donate_argnums=0).lower(
      params, tokens, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
  m = compiled.memory_analysis()
  return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)


@pytest.mark.parametrize('attention', ['lsh', 'full'])
def test_reversible_memory_is_flat_in_depth(attention):
  # Small width, long sequence: activations dominate parameters, as in the Reformer's regime.
  length = 2048 if attention == 'lsh' else 512
  cfg = ModelConfig(vocab_size=32, d_model=32, d_ff=64, n_heads=2, n_layers=2, max_len=length,
                    chunk_len=32, n_hashes=2, attention_types=(attention,))
  peaks = {(reversible, n): step_peak_bytes(cfg.replace(reversible=reversible, n_layers=n), 1,
                                            length)
           for reversible in (True, False) for n in (2, 12)}
  reversible_growth = peaks[True, 12] / peaks[True, 2]
  ordinary_growth = peaks[False, 12] / peaks[False, 2]
  assert reversible_growth <= 1.5, peaks
  assert ordinary_growth >= 3.0, peaks  # 6x the layers: roughly linear growth
