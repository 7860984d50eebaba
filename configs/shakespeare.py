"""Byte-level language model on Shakespeare's complete works, with long contexts (4K to 64K).

    python -m reformer_jax.main --config=configs/shakespeare.py:16k --workdir=/tmp/reformer/shakespeare_16k

The argument is the sequence length: `4k`, `8k`, `16k`, `32k` or `64k`. The batch shrinks as
the length grows so that every step sees 128K bytes. Text: `open_shakespeare/
shakespeare_gut_concat.txt.xz` under the data directory (5 MB of ASCII); its last 5% is held
out and reported as bits per character. Sized for an accelerator.
"""

from configs import default

LENGTHS = {'4k': 4096, '8k': 8192, '16k': 16384, '32k': 32768, '64k': 65536}
TOKENS_PER_BATCH = 131072


def get_config(arg: str = '16k'):
  """`arg`: the sequence length, one of `4k`, `8k`, `16k`, `32k`, `64k`."""
  if arg not in LENGTHS:
    raise ValueError(f'configs/shakespeare.py:{arg}: use one of {tuple(LENGTHS)}, '
                     f'e.g. --config=configs/shakespeare.py:16k')
  length = LENGTHS[arg]
  config = default.get_config()
  config.data.task = 'text'                 # data.text_file, bytes as tokens
  config.data.seq_len = length              # bytes per training crop
  config.model.vocab_size = 256             # bytes
  # Model: 6 reversible LSH layers of width 256, chunks of 128, 2 hashes.
  config.model.d_model = 256
  config.model.d_ff = 1024
  config.model.n_heads = 4
  config.model.n_layers = 6
  config.model.max_len = length
  config.model.chunk_len = 128
  config.model.n_hashes = 2
  config.model.ff_chunk_len = 4096 if length > 4096 else 0  # bounds feed-forward activations
  side = 2 ** (length.bit_length() // 2)    # near-square axial position table
  config.model.axial_shape = (side, length // side)
  config.batch_size = TOKENS_PER_BATCH // length  # 128K bytes per step at every length
  # Optimization and schedules, for one accelerator.
  config.num_train_steps = 20_000
  config.learning_rate = 1e-3
  config.warmup_steps = 1_000
  config.eval_batch_size = config.batch_size
  config.max_eval_batches = 0               # the whole held-out text
  config.eval_every_steps = 1_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1_000
  config.wandb.tags = ('shakespeare', arg)
  return config
