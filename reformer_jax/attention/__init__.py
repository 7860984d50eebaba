"""Functional attention kernels on `[batch, length, heads, head_dim]` arrays (no Flax)."""

from reformer_jax.attention.full import full_attention
from reformer_jax.attention.local import local_attention
from reformer_jax.attention.lsh import bucket_balance, default_n_buckets, hash_vectors, lsh_attention

__all__ = ['full_attention', 'local_attention', 'lsh_attention', 'hash_vectors',
           'bucket_balance', 'default_n_buckets']
