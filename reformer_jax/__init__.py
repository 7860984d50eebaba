"""reformer_jax: the Reformer (LSH attention, reversible layers) in JAX and Flax."""

from reformer_jax.attention import full_attention, local_attention, lsh_attention

__all__ = ['full_attention', 'local_attention', 'lsh_attention']
__version__ = '0.1.0'
