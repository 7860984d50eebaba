"""The duplication task of the Reformer paper (section 5), at the paper's size.

    python -m reformer_jax.main --config=configs/duplication.py:lsh4 --workdir=/tmp/reformer/dup_lsh4
    python -m reformer_jax.main --config=configs/duplication.py:full --workdir=/tmp/reformer/dup_full

Sequences `0 w 0 w`, |w| = 511 (length 1024) over 127 symbols; loss and accuracy only on the
second copy of w. One layer, d_model = d_ff = 256, 4 heads. The argument picks the attention
used in training: `full`, or LSH with 1, 2 or 4 hashes (`lsh1`, `lsh2`, `lsh4`), or
`full_self`: full attention in which a token may attend to its own shared query/key (the
others exclude it unless nothing else is allowed, the Reformer's shared-QK rule). Every
evaluation also runs with the hash counts in `eval_n_hashes` (0 = full attention) and with
`full_self` attention (`eval_full_self`), which gives the paper's table of train/eval
combinations from one run per row, e.g. `--config.eval_n_hashes='(1, 2, 4, 8, 0)'`. Sized for
an accelerator.
"""

from configs import default

ATTENTION = ('full', 'full_self', 'lsh1', 'lsh2', 'lsh4')


def get_config(arg: str = 'lsh4'):
  """`arg`: the training attention, one of `full`, `full_self`, `lsh1`, `lsh2`, `lsh4`."""
  if arg not in ATTENTION:
    raise ValueError(f'configs/duplication.py:{arg}: use one of {ATTENTION}, '
                     f'e.g. --config=configs/duplication.py:lsh2')
  config = default.get_config()
  config.data.seq_len = 1024                # 0 w 0 w with |w| = 511
  config.data.eval_examples = 1024          # fixed evaluation set
  config.model.vocab_size = 128             # separator 0 and 127 symbols
  config.model.n_layers = 1                 # one layer, as in the paper
  config.model.d_model = 256                # d_model = d_ff = 256
  config.model.d_ff = 256
  config.model.n_heads = 4                  # 4 heads of 64
  config.model.max_len = 1024
  config.model.chunk_len = 64               # LSH chunks of 64 (32 buckets per hash)
  # Learned absolute positions. With axial embeddings (a 16 x 16 grid at length 256) the copy
  # (attend |w| + 1 back) stalled: the positions in 3 of the 16 grid columns stayed at chance
  # (full attention: 81% accuracy from step ~800 to 1,500).
  config.model.pos_embedding = 'learned'
  if arg in ('full', 'full_self'):          # training attention, from the argument
    config.model.attention_types = ('full',)
    config.model.exclude_self = arg == 'full'
  else:
    config.model.attention_types = ('lsh',)
    config.model.n_hashes = int(arg[len('lsh'):])
  # Optimization and schedules (our choices), for one accelerator.
  config.batch_size = 32
  config.num_train_steps = 50_000           # our budget, not the paper's
  config.learning_rate = 1e-3
  config.warmup_steps = 1_000
  config.eval_batch_size = 64
  config.eval_every_steps = 2_000
  config.log_every_steps = 200
  config.checkpoint_every_steps = 2_000
  config.eval_n_hashes = (1, 2, 4, 8, 0)    # the paper's evaluation columns (0 = full)
  config.eval_full_self = True              # and full attention that lets a token see itself
  config.wandb.tags = ('duplication', arg)
  return config
