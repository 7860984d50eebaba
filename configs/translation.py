"""Encoder-decoder translation on Multi30k German -> English, reversible or standard layers.

    python -m reformer_jax.main --config=configs/translation.py --workdir=workdir/translation_rev
    python -m reformer_jax.main --config=configs/translation.py:standard --workdir=workdir/translation_std
    python -m reformer_jax.evaluate --task=translation --workdir=workdir/translation_rev --split=test

Trains on Multi30k's 29,000 training pairs (`config.data.data_dir`, else `$REFORMER_DATA_DIR`,
else `../shared/data`, folder `multi30k`), evaluates on `val` during training; BLEU is measured
on `test_2016_flickr` by `reformer_jax.evaluate`. One sentencepiece vocabulary is trained on
both languages at the first start and kept in the workdir. Both variants use full attention
(sentences are ~15 tokens; LSH buys nothing here): the comparison is reversible residual layers
(`y1 = x1 + Attention(x2)`, `y2 = x2 + FeedForward(y1)`, activations rebuilt in the backward
pass) against an ordinary residual stack, with the same budget and seed.

* '' (default): reversible layers (`model.reversible=True`).
* `standard`: the same model with ordinary residual layers.
* `tiny`: a small model on the first 512 pairs, for smoke tests (seconds).
"""

from configs import default


def get_config(arg: str = ''):
  """`arg`: '' reversible, `standard` ordinary residual layers, `tiny` smoke test."""
  if arg not in ('', 'standard', 'tiny'):
    raise ValueError(f"configs/translation.py:{arg}: use no argument, ':standard' or ':tiny'")
  config = default.get_config()
  config.data.task = 'translation'
  config.data.corpus = 'multi30k'          # folder under data_dir
  config.data.src_lang = 'de'
  config.data.tgt_lang = 'en'
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.src_len = 40                 # tokens per source row, EOS included (99.6% fit)
  config.data.seq_len = 40                 # tokens per target row, EOS included
  config.data.length_buckets = (12, 16, 20, 24, 32, 40)  # batches of similar-length pairs cut
                                           # to one of these widths (~2x fewer padded tokens)
  config.data.max_train_pairs = 0          # train on the first N pairs; 0: all
  config.data.max_eval_pairs = 0           # evaluate on the first N pairs; 0: all
  config.model.vocab_size = 8000           # shared de/en sentencepiece pieces
  # A 3 + 3 layer encoder-decoder of width 256 with full attention.
  config.model.attention_types = ('full',)
  config.model.shared_qk = False           # ordinary attention for translation
  config.model.pos_embedding = 'learned'
  config.model.d_model = 256
  config.model.d_ff = 1024
  config.model.n_heads = 4
  config.model.n_layers = 3
  config.model.n_decoder_layers = 3
  config.model.max_len = 40
  config.model.dropout = 0.1
  config.model.tie_embeddings = True
  config.model.reversible = arg != 'standard'
  config.batch_size = 64
  config.num_train_steps = 2_000           # ~4.4 epochs of 29K pairs: CPU-sized (6_000 on an accelerator)
  config.learning_rate = 1e-3
  config.warmup_steps = 400
  config.eval_batch_size = 100
  config.eval_every_steps = 1_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.wandb.tags = ('translation', 'standard' if arg == 'standard' else 'reversible')
  if arg == 'tiny':
    config.data.max_train_pairs = 512
    config.data.max_eval_pairs = 64
    config.data.prefetch = 0
    config.model.vocab_size = 500
    config.model.d_model = 32
    config.model.d_ff = 64
    config.model.n_heads = 2
    config.model.n_layers = 1
    config.model.n_decoder_layers = 1
    config.model.dropout = 0.0
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_train_steps = 20
    config.warmup_steps = 5
    config.eval_every_steps = 0
    config.log_every_steps = 10
    config.checkpoint_every_steps = 0
    config.fast_compile = True
    config.wandb.tags = ('translation', 'tiny')
  return config
