"""Default: a small Reformer (LSH attention, reversible layers) learns the duplication task on CPU.

    python -m reformer_jax.main --config=configs/default.py --workdir=/tmp/reformer/default

Sequences `0 w 0 w` with |w| = 63 over 15 symbols; loss and accuracy count only the second copy
of w, so chance is 1/15 = 0.067; it ends near 0.96. About 2-3 minutes on a 2-core CPU,
compilation included. `configs/default.py:tiny` is the smallest model on the same code path, for tests and
smoke runs (seconds).

Every other config starts from this one and changes a few fields.
"""

import ml_collections
from ml_collections import config_dict


def get_model_config() -> ml_collections.ConfigDict:
  """`config.model`: the fields of `reformer_jax.model_config.ModelConfig`, one to one."""
  m = ml_collections.ConfigDict()
  m.vocab_size = 16                 # token ids, separator/padding id 0 included
  m.d_model = 128                   # width of the residual streams
  m.d_ff = 256                      # hidden width of the feed-forward layers
  m.n_heads = 4                     # attention heads
  m.head_dim = config_dict.placeholder(int)  # per-head width; None: d_model // n_heads
  m.n_layers = 2                    # blocks
  m.n_decoder_layers = config_dict.placeholder(int)  # encoder-decoder only; None: n_layers
  m.attention_types = ('lsh',)      # per layer, cycled: 'lsh' | 'full' | 'local'
  m.max_len = 128                   # longest sequence (positional table); >= data.seq_len
  m.chunk_len = 16                  # LSH and local attention chunk length
  m.n_chunks_before = 1             # chunks each chunk also attends to, before it
  m.n_chunks_after = 0              # ... and after it (non-causal layers only)
  m.n_hashes = 2                    # LSH hash rounds during training
  m.n_buckets = config_dict.placeholder(object)  # even int or tuple; None: ~2 * len / chunk
  m.hash_seed = config_dict.placeholder(int)  # fixed rotations for evaluation; None: per batch
  m.shared_qk = True                # shared query/key in full/local layers too (LSH always)
  m.exclude_self = True             # shared QK: a token sees itself only when nothing else is
                                    # allowed; False (full attention only): like any other key
  m.reversible = True               # reversible residual stack (memory independent of depth)
  m.ff_chunk_len = 0                # tokens per feed-forward chunk; 0: unchunked
  m.keep_last = 1                   # last functions keeping their activations for the backward
                                    # pass (1: the last feed-forward; 2: the last block, faster,
                                    # more memory; 0: all recomputed, least memory)
  m.dropout = 0.0                   # residual, embedding and feed-forward dropout
  m.pos_embedding = 'axial'         # 'axial' | 'learned' | 'none'
  m.axial_shape = config_dict.placeholder(tuple)  # factors of the position table; None: auto
  m.axial_dims = config_dict.placeholder(tuple)   # their widths (sum d_model); None: halves
  m.tie_embeddings = False          # output layer shares the token embedding
  m.dtype = 'float32'               # compute dtype: 'float32' | 'bfloat16' (params stay float32)
  m.param_dtype = 'float32'         # parameter dtype
  return m


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The base configuration; `arg='tiny'` shrinks it for tests."""
  if arg not in ('', 'tiny'):
    raise ValueError(f"configs/default.py:{arg}: use no argument or ':tiny'")
  config = ml_collections.ConfigDict()
  config.seed = 0                   # root PRNG key: init, dropout, LSH rotations (fold_in(step))
  config.num_devices = 0            # devices in the mesh; 0: all (the batch is split over them)

  config.data = d = ml_collections.ConfigDict()
  d.task = 'duplication'            # 'duplication' | 'dialogue' | 'text'
  d.seq_len = 128                   # tokens per training row
  d.seed = 0                        # data order: batch s is a pure function of (seed, s)
  d.prefetch = 2                    # batches built ahead on background threads (grain); 0: off
  d.eval_examples = 512             # duplication: size of the fixed evaluation set
  d.data_dir = ''                   # data root; '': $REFORMER_DATA_DIR, else ../shared/data
  d.text_file = 'open_shakespeare/shakespeare_gut_concat.txt.xz'  # text: file under data_dir
  d.validation_fraction = 0.05      # text: the file's tail held out for evaluation
  d.train_corpus = 'sgd'            # dialogue: training corpus (folder or file) under data_dir
  d.train_split = 'train'           # dialogue: its split; '' when train_corpus is a file
  d.eval_corpus = 'multiwoz'        # dialogue: evaluation corpus (folder or file) under data_dir
  d.eval_split = 'validation'       # dialogue: its split; '' when eval_corpus is a file
  d.max_train_dialogues = 0         # dialogue: use only the first N training dialogues; 0: all
  d.max_eval_dialogues = 0          # dialogue: ... evaluation dialogues; 0: all
  d.loss_on = 'all'                 # dialogue: 'all' tokens or only the 'replies' (Person 2)
  d.truncate = 'turns'              # dialogue: long ones keep their newest 'turns', or 'drop'

  config.model = get_model_config()

  config.batch_size = 32            # global batch (rows), split over devices and processes
  config.grad_accum_steps = 1       # micro-batches per update (same gradient, less memory)
  config.num_train_steps = 300      # updates
  config.optimizer = 'adamw'        # 'adamw' | 'adafactor'
  config.learning_rate = 2e-3       # peak learning rate
  config.schedule = 'rsqrt'         # after warmup: 'rsqrt' | 'cosine' | 'constant'
  config.warmup_steps = 100         # linear warmup from 0
  config.final_lr_fraction = 0.1    # cosine: final learning rate / peak
  config.weight_decay = 0.0         # decoupled weight decay on matrices; 0: off
  config.adam_b1 = 0.9              # AdamW first-moment decay
  config.adam_b2 = 0.98             # AdamW second-moment decay
  config.adam_eps = 1e-9            # AdamW epsilon
  config.grad_clip_norm = 1.0       # clip gradients to this global norm; 0: off

  config.eval_batch_size = 64       # global evaluation batch
  config.max_eval_batches = 0       # evaluate on at most this many batches; 0: the whole set
  config.eval_n_hashes = ()         # also evaluate with n hashes (0 = full attention), e.g. (1, 4)
  config.eval_full_self = False     # also evaluate with full attention in which a token may
                                    # attend to its own shared query/key (eval_full_self/...)
  config.eval_every_steps = 100     # evaluation interval; 0: only at the end
  config.log_every_steps = 50       # training metrics and progress line interval
  config.checkpoint_every_steps = 200  # checkpoint interval; 0: only at the end (and SIGTERM)
  config.max_checkpoints_to_keep = 3   # older checkpoints are deleted; 0: keep all
  config.profile_steps = 0          # trace this many steps (from the 2nd) to <workdir>/profile
  config.fast_compile = False       # XLA optimization level 0: compiles ~2x faster, runs slower

  config.wandb = w = ml_collections.ConfigDict()
  w.mode = 'auto'                   # 'auto' (online with an API key, else offline) | 'online' |
                                    # 'offline' | 'disabled'; 'auto' follows $WANDB_MODE if set
  w.project = 'reformer-jax'        # W&B project
  w.entity = ''                     # W&B entity (team or user); '': your default
  w.name = ''                       # run name; '': the workdir's name
  w.tags = ('duplication',)         # run tags

  if arg == 'tiny':
    config.data.seq_len = 32        # 0 w 0 w with |w| = 15
    config.data.eval_examples = 64
    config.data.prefetch = 0
    config.model.vocab_size = 8
    config.model.d_model = 32
    config.model.d_ff = 64
    config.model.n_heads = 2
    config.model.n_layers = 1
    config.model.max_len = 32
    config.model.chunk_len = 8
    config.batch_size = 8
    config.eval_batch_size = 32
    config.num_train_steps = 300
    config.warmup_steps = 20
    config.learning_rate = 1e-2
    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.fast_compile = True
    config.wandb.tags = ('duplication', 'tiny')
  return config
