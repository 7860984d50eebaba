"""Training sweep on the dialogue model: peak learning rate x LSH hash rounds.

    python -m launch.sweep launch/sweeps/chatbot_lr_hashes.py         # configs/chatbot.py, 9 runs
    python -m launch.sweep launch/sweeps/chatbot_lr_hashes.py:tiny    # configs/chatbot.py:tiny, 4 runs

Each run is `python -m reformer_jax.main --config=configs/chatbot.py --workdir=<root>/<run>` with
`--config.learning_rate` and `--config.model.n_hashes` set; an interrupted run resumes from its
newest checkpoint when the sweep is started again. On a multi-host TPU slice give every run
`--distributed` and bucket workdirs:

    python -m launch.sweep launch/sweeps/chatbot_lr_hashes.py --workdirs gs://BUCKET/chatbot -- --distributed
"""

from launch.sweep import Sweep, grid


def get_sweep(arg: str = '') -> Sweep:
  if arg not in ('', 'tiny'):
    raise ValueError(f"launch/sweeps/chatbot_lr_hashes.py:{arg}: use no argument or ':tiny'")
  tiny = arg == 'tiny'
  axes = ({'config.learning_rate': (1e-3, 3e-3), 'config.model.n_hashes': (1, 2)} if tiny else
          {'config.learning_rate': (3e-4, 1e-3, 3e-3), 'config.model.n_hashes': (1, 2, 4)})
  return Sweep(
      name='chatbot_tiny_lr_hashes' if tiny else 'chatbot_lr_hashes',
      command=('{python}', '-m', 'reformer_jax.main',
               f'--config=configs/chatbot.py{":tiny" if tiny else ""}', '--workdir={workdir}'),
      points=grid(axes))
