"""Configs: every config and argument validates, variants derive from the default, command-line
overrides reach the fields, and bad values fail up front naming the field and the fix."""

from __future__ import annotations

import importlib

import pytest
from absl import flags
from ml_collections import config_flags

from test_train import REPO, tiny_config  # noqa: F401  (REPO puts configs/ on sys.path)
from reformer_jax import train
from reformer_jax.model_config import ModelConfig

CONFIGS = {  # module -> its arguments
    'default': ['', 'tiny'],
    'duplication': ['full', 'lsh1', 'lsh2', 'lsh4'],
    'chatbot': ['', 'full', 'large', 'tiny'],
    'translation': ['', 'standard', 'tiny'],
    'shakespeare': ['4k', '8k', '16k', '32k', '64k'],
}
ALL = [(name, arg) for name, args in CONFIGS.items() for arg in args]


def _config(name, arg):
  module = importlib.import_module(f'configs.{name}')
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize('name,arg', ALL)
def test_every_config_validates_and_maps_onto_model_config(name, arg):
  config = _config(name, arg)
  model_cfg = train.validate_config(config)
  assert model_cfg == ModelConfig.from_dict(config.model)
  assert set(config.model) == set(ModelConfig.__dataclass_fields__)  # one to one
  assert config.data.seq_len <= model_cfg.max_len


@pytest.mark.parametrize('name', CONFIGS)
def test_docstring_gives_the_run_command_and_variants_derive(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'python -m reformer_jax.main --config=configs/{name}.py' in module.__doc__
  text = (REPO / 'configs' / f'{name}.py').read_text()
  if name != 'default':
    assert 'default.get_config()' in text and 'ml_collections.ConfigDict()' not in text


def test_paper_duplication_settings():
  config = _config('duplication', 'lsh2')
  assert (config.data.seq_len, config.model.vocab_size, config.model.n_layers) == (1024, 128, 1)
  assert (config.model.d_model, config.model.d_ff, config.model.n_heads) == (256, 256, 4)
  assert config.model.attention_types == ('lsh',) and config.model.n_hashes == 2
  assert _config('duplication', 'full').model.attention_types == ('full',)
  variants = train.eval_variants(config, train.validate_config(config))
  assert set(variants) == {'eval', 'eval_lsh1', 'eval_lsh2', 'eval_lsh4', 'eval_lsh8', 'eval_full',
                           'eval_full_self'}
  assert variants['eval_lsh8'].n_hashes == 8 and variants['eval_full'].attention_types == ('full',)
  assert variants['eval_full'].exclude_self and not variants['eval_full_self'].exclude_self
  # The row trained with full attention that lets a token see itself: its LSH and `full`
  # evaluations exclude the token's own key again.
  config = _config('duplication', 'full_self')
  trained = train.validate_config(config)
  assert trained.attention_types == ('full',) and not trained.exclude_self
  variants = train.eval_variants(config, trained)
  assert variants['eval_lsh4'].exclude_self and variants['eval_full'].exclude_self
  assert not variants['eval'].exclude_self and not variants['eval_full_self'].exclude_self


@pytest.mark.parametrize('module,arg', [('duplication', 'lsh3'), ('shakespeare', '5k'),
                                        ('chatbot', 'huge'), ('default', 'big')])
def test_unknown_argument_lists_the_choices(module, arg):
  with pytest.raises(ValueError, match=f'configs/{module}.py:{arg}: use'):
    _config(module, arg)


def _parse_command_line(*args):
  """Parses `main.py`-style flags into a config, as `python -m reformer_jax.main` does."""
  argv = ['main', *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_command_line_overrides_reach_nested_and_optional_fields():
  config = _parse_command_line(
      f'--config={REPO}/configs/duplication.py:lsh1', '--config.num_train_steps=7',
      '--config.model.n_layers=3', '--config.model.n_buckets=16', '--config.model.head_dim=32',
      '--config.eval_n_hashes=(2, 0)', "--config.model.attention_types=('lsh', 'full')")
  assert config.num_train_steps == 7 and config.eval_n_hashes == (2, 0)
  model_cfg = train.validate_config(config)
  assert (model_cfg.n_layers, model_cfg.n_buckets, model_cfg.head_dim) == (3, 16, 32)
  assert model_cfg.attention_types == ('lsh', 'full') and model_cfg.n_hashes == 1
  with pytest.raises(AttributeError, match='Did you mean "n_layers"'):  # a typo is refused
    _parse_command_line(f'--config={REPO}/configs/default.py', '--config.model.n_layer=3')


@pytest.mark.parametrize('overrides,message', [
    (dict(data__seq_len=36, model__max_len=40),
     r'config\.data\.seq_len=36 is not a multiple of model\.chunk_len=8: use seq_len=40'),
    (dict(data__seq_len=64), r'config\.model\.max_len=32 is shorter than data\.seq_len=64: set '
                             r'model\.max_len=64'),
    (dict(data__task='music'), r"config\.data\.task='music': use one of"),
    (dict(optimizer='sgd'), r"config\.optimizer='sgd': use one of \('adamw', 'adafactor'\)"),
    (dict(schedule='linear'), r"config\.schedule='linear': use one of"),
    (dict(batch_size=6, grad_accum_steps=4),
     r'config\.batch_size=6 is not divisible by grad_accum_steps=4'),
    (dict(schedule='cosine', warmup_steps=300), r'config\.warmup_steps=300 must be < '
                                                r'num_train_steps=300 for the cosine schedule'),
    (dict(eval_n_hashes=(-1,)), r'config\.eval_n_hashes=\(-1,\): give ints >= 0'),
    (dict(eval_n_hashes=(2,), model__shared_qk=False, model__attention_types=('full',)),
     r'eval_n_hashes needs model\.shared_qk=True'),
    (dict(eval_full_self=True, model__shared_qk=False, model__attention_types=('full',)),
     r'eval_full_self needs model\.shared_qk=True'),
    (dict(data__task='text'), r'config\.model\.vocab_size=8: the byte-level text task needs 256'),
    (dict(wandb__mode='sometimes'), r"config\.wandb\.mode='sometimes': use one of"),
    (dict(num_train_steps=0), r'config\.num_train_steps=0 must be an int >= 1'),
    (dict(model__d_model=33), r'd_model 33 is not divisible by n_heads 2'),
])
def test_bad_values_fail_naming_the_field_and_the_fix(overrides, message):
  with pytest.raises(ValueError, match=message):
    train.validate_config(tiny_config(**overrides))
