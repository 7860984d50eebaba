"""Smoke sweep: two tiny duplication runs (seeds 0 and 1), to check a machine end to end.

    python -m launch.sweep launch/sweeps/smoke.py                     # about a minute on a CPU
    python -m launch.sweep launch/sweeps/smoke.py -- --config.num_train_steps=5

`configs/default.py:tiny` for 20 steps, W&B off. Only the seed differs, so the second run reuses
the first one's compiled programs when `JAX_COMPILATION_CACHE_DIR` is set.
"""

from launch.sweep import Sweep, grid


def get_sweep(arg: str = '') -> Sweep:
  if arg:
    raise ValueError(f'launch/sweeps/smoke.py takes no argument, got {arg!r}')
  return Sweep(
      name='smoke',
      command=('{python}', '-m', 'reformer_jax.main', '--config=configs/default.py:tiny',
               '--workdir={workdir}', '--config.num_train_steps=20',
               '--config.wandb.mode=disabled'),
      points=grid({'config.seed': (0, 1)}))
