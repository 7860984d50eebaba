"""reformer_jax: the Reformer (LSH attention, reversible layers) in JAX and Flax."""

__all__ = ['full_attention', 'local_attention', 'lsh_attention']
__version__ = '0.1.0'


def __getattr__(name: str):
  # The attention kernels load on first use, so that importing a JAX-free submodule
  # (`reformer_jax.host_memory`, which the PyTorch peers of experiments/peers.py import) does not
  # import JAX.
  if name in __all__:
    from reformer_jax import attention  # pylint: disable=import-outside-toplevel
    return getattr(attention, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
