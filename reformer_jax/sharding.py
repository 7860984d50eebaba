"""Device mesh and shardings: the batch split over every device, parameters replicated.

This replaces the legacy `pmap` + `flax.jax_utils.replicate` recipe: one `jax.jit` program over
a `jax.sharding.Mesh` with a single `'data'` axis. The train state lives replicated on every
device (`PartitionSpec()`), batches are split along their first axis (`PartitionSpec('data')`),
and XLA inserts the gradient all-reduce. The same program runs on one CPU, eight fake CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), a GPU host or several
processes joined by `jax.distributed.initialize`.

Each process loads only its own rows of the global batch (`reformer_jax.data` slices them by
`jax.process_index()`); `global_batch` assembles them into global arrays with
`jax.make_array_from_process_local_data`.

The mesh is built with `jax.sharding.Mesh` directly: `jax.make_mesh` gives Explicit axis types
in this JAX version, which would change how sharding propagates through the model.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D `('data',)` mesh over all devices, or over the first `num_devices` (one process only)."""
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1:
      raise ValueError(f'config.num_devices={num_devices}: with {jax.process_count()} processes '
                       f'every device must take part; set num_devices=0')
    if num_devices > len(devices):
      raise ValueError(f'config.num_devices={num_devices} but only {len(devices)} devices exist; '
                       f'use at most {len(devices)}, or 0 for all')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, keys, metrics)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows (the leading axis) split over the `'data'` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(name: str, batch_size: int, mesh: Mesh, multiple: int = 1) -> None:
  """Raises a ValueError naming config field `name` unless the batch splits evenly."""
  divisor = mesh.size * multiple
  if batch_size % divisor or batch_size % jax.process_count():
    what = f'{mesh.size} devices' + (f' x grad_accum_steps {multiple}' if multiple > 1 else '')
    fixed = max(divisor, -(-batch_size // divisor) * divisor)
    raise ValueError(f'config.{name}={batch_size} is not divisible by {what} = {divisor}: use '
                     f'{name}={fixed} (a multiple of {divisor})')


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global `jax.Array`s sharded over the `'data'` axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree (identical on every process) replicated on the mesh."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                             lambda index: np.asarray(x)[index]),
                      tree)
