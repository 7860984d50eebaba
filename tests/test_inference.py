"""reformer_jax.inference: prompts in the training format, context truncation, reply cutting,
input cleaning, and loading a model (parameters only) from a workdir.

Prompt and reply tests use the byte tokenizer (one token per byte, so lengths are easy to reason
about); the rest use the tiny chatbot trained once per session (conftest.py).
"""

from __future__ import annotations

import argparse
import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from conftest import CHAT_STEPS
from reformer_jax import checkpointing, data, inference, sharding, train
from reformer_jax.data.dialogues import SYSTEM, USER, Dialogue, format_dialogue
from reformer_jax.models import ReformerLM

BYTES = data.ByteTokenizer()


def _dialogue(*texts: str) -> Dialogue:
  """Turns alternate Person 1 (user) and Person 2 (system), starting with Person 1."""
  return Dialogue('d', [(USER if i % 2 == 0 else SYSTEM, t) for i, t in enumerate(texts)])


# --------------------------------------------------------------------------- prompts


def test_prompts_end_with_the_reply_label_of_every_person2_turn():
  dialogue = _dialogue('a' * 20, 'b' * 20, 'c' * 20, 'd' * 20)
  prompts = inference.reply_prompts(dialogue, BYTES, max_len=1000)
  assert [p.turn for p in prompts] == [1, 3] and [p.first_turn for p in prompts] == [0, 0]
  text = format_dialogue(dialogue)
  for p in prompts:
    assert p.ids.dtype == np.int32 and p.ids[0] == data.PAD_ID  # the shifted-in start id
  assert BYTES.decode(prompts[0].ids) == text[:text.index(' b')]
  assert BYTES.decode(prompts[1].ids) == text[:text.index(' d')]
  assert BYTES.decode(prompts[1].ids).endswith('Person 1: ' + 'c' * 20 + ' Person 2:')


def test_long_contexts_drop_their_oldest_turns():
  # Bytes: a turn takes 31 tokens ("Person k: " + 20 letters + the separating space), the label
  # 9; the prompt of turn 3 needs 1 + 3 * 31 + 9 = 103 positions.
  dialogue = _dialogue('a' * 20, 'b' * 20, 'c' * 20, 'd' * 20)
  assert len(inference.reply_prompts(dialogue, BYTES, max_len=103)[1].ids) == 103
  prompt = inference.reply_prompts(dialogue, BYTES, max_len=102)[1]
  assert prompt.first_turn == 1 and len(prompt.ids) == 72
  assert BYTES.decode(prompt.ids) == f'Person 2: {"b" * 20} Person 1: {"c" * 20} Person 2:'
  # Not even the newest turn fits: its newest tokens are kept, up to the label.
  prompt = inference.reply_prompts(dialogue, BYTES, max_len=30)[1]
  assert prompt.first_turn == 2 and len(prompt.ids) == 30
  assert BYTES.decode(prompt.ids) == f'{"c" * 19} Person 2:'
  with pytest.raises(ValueError, match='at least 16 positions'):
    inference.reply_prompts(dialogue, BYTES, max_len=8)


def test_prompts_are_the_training_rows_up_to_the_reply(chat_workdir, shared_data):
  """With the run's sentencepiece tokenizer a prompt is, token for token, the start of the row
  training builds from the same dialogue, and the next token is the first of the reply."""
  tokenizer = data.SentencePieceTokenizer(chat_workdir / 'tokenizer.model')
  dialogues = data.load_dialogues(shared_data / 'multiwoz', 'validation')[:3]
  rows = data.DialogueExamples.build(dialogues, tokenizer, 4096)  # nothing truncated
  for k, dialogue in enumerate(dialogues):
    start = rows.offsets[k]
    row, reply = rows.tokens[start:rows.offsets[k + 1]], rows.reply[start:rows.offsets[k + 1]]
    for prompt in inference.reply_prompts(dialogue, tokenizer, 4096):
      n = len(prompt.ids) - 1
      np.testing.assert_array_equal(prompt.ids[1:], row[:n])
      assert reply[n] and not reply[n - 1]
      assert tokenizer.decode(prompt.ids).endswith('Person 2:')


class Words:
  """A tokenizer with one id per whitespace-separated word (ids from 3)."""

  def __init__(self):
    self.vocab: dict[str, int] = {}

  def encode(self, text: str) -> list[int]:
    return [self.vocab.setdefault(w, len(self.vocab) + 3) for w in text.split()]

  def decode(self, ids) -> str:
    words = {i: w for w, i in self.vocab.items()}
    return ' '.join(words[i] for i in ids if i in words)


def test_generation_stops_at_the_labels_first_piece_only_when_it_is_the_whole_word():
  words = Words()
  assert inference.stop_ids_of(words) == (data.EOS_ID, words.encode('Person')[0])
  assert inference.stop_ids_of(BYTES) == (data.EOS_ID,)  # its first piece 'P' would stop 'Please'


# --------------------------------------------------------------------------- text


def test_cut_reply_stops_at_eos_stop_ids_and_speaker_labels():
  cut = lambda text, *extra: inference.cut_reply(BYTES.encode(text) + list(extra), BYTES)
  assert cut(' Sure, at 5 pm. Person 1: thanks') == 'Sure, at 5 pm.'
  assert cut(' Done. Person 2: more') == 'Done.'
  assert cut(' Bye.', data.EOS_ID, *BYTES.encode(' after the end')) == 'Bye.'
  assert cut(' Person 1: hi') == ''
  assert cut(' two\x07 \t spaces ') == 'two spaces'
  stop = BYTES.encode('#')[0]
  assert inference.cut_reply(BYTES.encode(' a#b'), BYTES, stop_ids=(data.EOS_ID, stop)) == 'a'


def test_clean_text_keeps_every_script_and_drops_control_characters():
  text = 'こんにちは 🙂 مرحبا \u200fשלום e\u0301 👩\u200d💻'
  assert inference.clean_text(f'  {text}\n') == text
  assert inference.clean_text('a\tb\x00c\x1b[31m\r\n') == 'a b c [31m'
  assert inference.clean_text('lone \ud800 surrogate') == 'lone \ufffd surrogate'
  assert inference.clean_text('   \x00 ') == ''
  assert inference.clean_text('oldest ' + 'x' * 50, max_chars=10) == 'x' * 10


# --------------------------------------------------------------------------- loading


def test_load_model_restores_only_the_checkpoint_parameters(chat_workdir):
  model = inference.load_model(chat_workdir)
  assert model.step == CHAT_STEPS and model.seq_len == 256 and model.cfg.hash_seed == 0
  label = model.tokenizer.encode('Person 1:')[0]  # 'Person' may be one piece or several
  whole_word = model.tokenizer.decode([label]) == 'Person'
  assert model.stop_ids == ((data.EOS_ID, label) if whole_word else (data.EOS_ID,))
  # The same parameters as a full restore of the train state (optimizer state included).
  config = ml_collections.ConfigDict(checkpointing.load_config_dict(chat_workdir))
  tx = train.make_optimizer(config, train.make_schedule(config))
  abstract, _, _ = train.create_train_state(ReformerLM(model.cfg), tx, config, sharding.make_mesh(),
                                            jax.random.PRNGKey(0))
  checkpointer = checkpointing.Checkpointer(chat_workdir)
  try:
    full = checkpointer.restore_step(CHAT_STEPS, abstract)
  finally:
    checkpointer.close()
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), model.params, full.params))
  assert inference.load_model(chat_workdir, hash_seed=7).cfg.hash_seed == 7


def test_load_model_says_what_is_missing(tmp_path, chat_workdir):
  with pytest.raises(inference.ModelLoadError, match='does not exist'):
    inference.load_model(tmp_path / 'nowhere')
  with pytest.raises(inference.ModelLoadError, match='no config.json'):
    inference.load_model(tmp_path)
  shutil.copy(chat_workdir / 'config.json', tmp_path)
  with pytest.raises(inference.ModelLoadError, match='no tokenizer'):
    inference.load_model(tmp_path)
  shutil.copy(chat_workdir / 'tokenizer.model', tmp_path)
  with pytest.raises(inference.ModelLoadError, match='no checkpoint in'):
    inference.load_model(tmp_path)
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(inference.ModelLoadError, match='no checkpoint in'):
    inference.load_model(tmp_path)
  with pytest.raises(inference.ModelLoadError, match=rf'pass --step= one of \[{CHAT_STEPS}\]'):
    inference.load_model(chat_workdir, step=CHAT_STEPS + 1)
  config = json.loads((tmp_path / 'config.json').read_text())
  config['data']['task'] = 'duplication'
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(inference.ModelLoadError, match="data.task='duplication'"):
    inference.load_model(tmp_path)


def test_best_step_is_the_kept_checkpoint_with_the_lowest_validation_loss(tmp_path):
  records = [{'step': 100, 'train/loss': 0.1}, {'step': 500, 'eval/loss': 2.0},
             {'step': 1000, 'eval/loss': 1.5}, {'step': 1500, 'eval/loss': 1.2},
             {'step': 1000, 'eval/loss': 1.1},  # a resumed run evaluated step 1000 again
             {'step': 2000, 'eval_full/loss': 0.1}, {'step': 2000, 'eval/loss': 1.3}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  assert inference.best_step(tmp_path, [500, 1000, 1500, 2000]) == 1000
  assert inference.best_step(tmp_path, [500, 1500, 2000]) == 1500  # 1000 was not kept
  assert inference.best_step(tmp_path, [100, 2000, 2500]) == 2000  # only 2000 was evaluated
  with pytest.raises(inference.ModelLoadError, match=r'evaluated steps: \[500, 1000, 1500, 2000\]'):
    inference.best_step(tmp_path, [100, 2500])
  with pytest.raises(inference.ModelLoadError, match='needs metrics.jsonl'):
    inference.best_step(tmp_path / 'elsewhere', [100])
  assert inference.step_arg('best') == 'best' and inference.step_arg('1500') == 1500
  with pytest.raises(argparse.ArgumentTypeError, match="--step=last: pass a checkpoint step"):
    inference.step_arg('last')


def test_load_model_best_step(chat_workdir):
  assert inference.load_model(chat_workdir, step='best').step == CHAT_STEPS


def test_decode_options_name_the_bad_flag(chat_workdir):
  model = inference.load_model(chat_workdir)
  inference.DecodeOptions().validate(model)
  with pytest.raises(ValueError, match=r'--max_reply_tokens=250 must be in \[1, 240\]'):
    inference.DecodeOptions(max_reply_tokens=250).validate(model)
  with pytest.raises(ValueError, match='--strategy=nucleus'):
    inference.DecodeOptions(strategy='nucleus').validate(model)
  with pytest.raises(ValueError, match='--beam=0'):
    inference.DecodeOptions(beam=0).validate(model)
