"""Dialogue language model: `Person 1: ... Person 2: ...` text with a sentencepiece tokenizer.

    python -m reformer_jax.main --config=configs/chatbot.py --workdir=workdir/chatbot
    python -m reformer_jax.main --config=configs/chatbot.py:full --workdir=workdir/chatbot_full
    python -m reformer_jax.main --config=configs/chatbot.py:tiny --workdir=/tmp/reformer/chatbot_tiny

Trains on the Schema-Guided Dialogue corpus (train split, 16,142 dialogues; the same JSON format
as MultiWOZ 2.2) and evaluates on the MultiWOZ 2.1 validation split. The data is read from
`config.data.data_dir`, else `$REFORMER_DATA_DIR`, else `../shared/data`. The tokenizer is
trained on the training text at the first start and kept in the workdir (`tokenizer.model`); a
resumed run reuses it, so an interrupted run continues by rerunning its command.

* '' (default): a 4-layer reversible LSH Reformer sized for a 2-core CPU (~30 min alone).
* `full`: the same model and budget with full attention, the baseline.
* `large`: 6 layers of width 512, 4 hashes, 1,024-token context, for an accelerator.
* `tiny`: a small model on the 128 dialogues of one SGD file (under a minute on a 2-core CPU),
  for smoke tests of chat and evaluate.
"""

from configs import default


def get_config(arg: str = ''):
  """`arg`: '' the CPU-sized Reformer, `full` its full-attention baseline (same budget), `large`
  the accelerator-sized model, `tiny` the quick smoke-test model."""
  if arg not in ('', 'full', 'large', 'tiny'):
    raise ValueError(f"configs/chatbot.py:{arg}: use no argument, ':full', ':large' or ':tiny'")
  config = default.get_config()
  config.data.task = 'dialogue'            # SGD train, MultiWOZ validation (default.py's data.*)
  config.data.seq_len = 512                # tokens per row; longer dialogues keep their newest turns
  config.data.loss_on = 'all'              # learn both speakers ('replies': only Person 2)
  config.data.max_eval_dialogues = 200     # first 200 MultiWOZ validation dialogues per eval
  config.model.vocab_size = 4000           # sentencepiece pieces (pad 0, eos 1, unk 2)
  # Model: 4 reversible LSH layers of width 256, 2 hashes; ~5M parameters, ~2,100 tokens/s on
  # a 2-core CPU, so 800 steps of 8 x 512 tokens (3.3M tokens, ~0.25 epoch of SGD) take ~30 min.
  config.model.d_model = 256
  config.model.d_ff = 1024
  config.model.n_heads = 4
  config.model.n_layers = 4
  config.model.max_len = 512
  config.model.chunk_len = 64
  config.model.n_hashes = 2
  config.model.dropout = 0.0               # less than one epoch: nothing to regularize yet
  config.batch_size = 8
  config.num_train_steps = 800
  config.learning_rate = 1e-3
  config.warmup_steps = 100
  config.eval_batch_size = 16
  config.eval_every_steps = 500
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  config.wandb.tags = ('chatbot',)
  if arg == 'full':                        # the baseline: same model and budget, full attention
    config.model.attention_types = ('full',)
    config.wandb.tags = ('chatbot', 'full-attention')
  if arg == 'large':
    # 6 reversible LSH layers of width 512, 4 hashes, 1,024-token context: for an accelerator.
    config.data.seq_len = 1024
    config.data.max_eval_dialogues = 0
    config.model.vocab_size = 8000
    config.model.d_model = 512
    config.model.d_ff = 2048
    config.model.n_heads = 8
    config.model.n_layers = 6
    config.model.max_len = 1024
    config.model.n_hashes = 4
    config.model.dropout = 0.1
    config.batch_size = 32
    config.num_train_steps = 20_000
    config.warmup_steps = 1_000
    config.eval_batch_size = 32
    config.eval_every_steps = 1_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1_000
    config.wandb.tags = ('chatbot', 'large')
  if arg == 'tiny':
    config.data.train_corpus = 'sgd/train/dialogues_001.json.xz'  # 128 SGD training dialogues
    config.data.train_split = ''           # train_corpus is a file
    config.data.max_eval_dialogues = 64    # first 64 MultiWOZ validation dialogues
    config.data.seq_len = 256
    # A 2-layer model of width 64 and a 1000-piece tokenizer; 60 steps, evaluated at the end.
    config.model.vocab_size = 1000
    config.model.d_model = 64
    config.model.d_ff = 128
    config.model.n_heads = 2
    config.model.n_layers = 2
    config.model.max_len = 256
    config.model.chunk_len = 32
    config.model.n_hashes = 2
    config.model.dropout = 0.0
    config.batch_size = 16
    config.num_train_steps = 60
    config.learning_rate = 3e-3
    config.warmup_steps = 20
    config.eval_every_steps = 0
    config.log_every_steps = 20
    config.checkpoint_every_steps = 0
    config.wandb.tags = ('chatbot', 'tiny')
  return config
