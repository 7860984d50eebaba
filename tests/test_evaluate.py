"""reformer_jax.evaluate: perplexity, BLEU and ROUGE-L of the tiny chatbot (conftest.py) on a few
MultiWOZ 2.1 validation dialogues and an SGD file; the JSON on stdout; greedy determinism.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import CHAT_STEPS, REPO, persistent_compilation_cache
from reformer_jax import data, evaluate
from reformer_jax.data.dialogues import SYSTEM

FIELDS = {'task', 'workdir', 'step', 'data', 'split', 'strategy', 'decode', 'perplexity',
          'reply_perplexity', 'loss', 'accuracy', 'bleu', 'bleu_signature', 'rouge_l',
          'n_dialogues', 'n_replies', 'n_tokens', 'n_reply_tokens', 'samples'}
N_DIALOGUES = 2


@pytest.fixture(scope='module', autouse=True)
def _shared_compilations(compile_cache_dir):
  """What this module compiles in-process, the command-line run below finds in the cache."""
  with persistent_compilation_cache(compile_cache_dir):
    yield


@pytest.fixture(scope='module')
def multiwoz_flags(chat_workdir, shared_data):
  return [f'--workdir={chat_workdir}', f'--data={shared_data / "multiwoz"}', '--split=validation',
          f'--max_dialogues={N_DIALOGUES}', '--batch_size=8', '--max_reply_tokens=16',
          '--num_samples=2']


@pytest.fixture(scope='module')
def greedy(multiwoz_flags):
  return evaluate.run(evaluate.parse_args(multiwoz_flags))


def _check(result, dialogues):
  assert FIELDS <= set(result)
  assert result['task'] == 'dialogue' and result['step'] == CHAT_STEPS
  assert result['machine']['backend'] == 'cpu' and result['machine']['jax_version']
  assert result['n_dialogues'] == len(dialogues)
  assert result['n_replies'] == sum(s == SYSTEM for d in dialogues for s, _ in d.turns)
  assert result['n_tokens'] > result['n_reply_tokens'] > 0
  assert 1 < result['perplexity'] < 1000 and math.isfinite(result['reply_perplexity'])
  assert 0 <= result['bleu'] <= 100 and 0 <= result['rouge_l'] <= 100
  json.dumps(result)  # serializable as it is


def test_multiwoz_validation_metrics(greedy, chat_workdir, shared_data):
  dialogues = data.load_dialogues(shared_data / 'multiwoz', 'validation')[:N_DIALOGUES]
  _check(greedy, dialogues)
  assert greedy['workdir'] == str(chat_workdir) and greedy['strategy'] == 'greedy'
  assert greedy['decode']['max_reply_tokens'] == 16
  first = greedy['samples'][0]
  assert len(greedy['samples']) == 2 and first['dialogue_id'] == dialogues[0].id
  assert first['prompt'] == f'Person 1: {dialogues[0].turns[0][1]} Person 2:'
  assert first['reference'] == dialogues[0].turns[1][1]
  assert 'Person 1:' not in first['generated']


def test_greedy_evaluation_is_deterministic(greedy, multiwoz_flags):
  again = evaluate.run(evaluate.parse_args(multiwoz_flags))
  for key in ('perplexity', 'reply_perplexity', 'bleu', 'rouge_l', 'samples'):
    assert again[key] == greedy[key], key


def test_sampling_strategy(multiwoz_flags):
  result = evaluate.run(evaluate.parse_args([*multiwoz_flags, '--strategy=sample', '--top_k=20']))
  assert result['strategy'] == 'sample' and result['decode']['top_k'] == 20
  assert 0 <= result['bleu'] <= 100


@pytest.mark.slow
@pytest.mark.parametrize('strategy', ['--strategy=beam', '--strategy=mbr'])
def test_beam_and_mbr_strategies(multiwoz_flags, strategy):
  result = evaluate.run(evaluate.parse_args([*multiwoz_flags, strategy, '--beam=2',
                                             '--mbr_samples=2', '--max_dialogues=1']))
  assert result['n_replies'] > 0 and 0 <= result['bleu'] <= 100


def test_command_line_prints_one_json_object_for_an_sgd_file(chat_workdir, cli_env, shared_data):
  path = shared_data / 'sgd' / 'test' / 'dialogues_001.json.xz'
  if not path.is_file():
    pytest.skip(f'{path} is not staged')
  proc = subprocess.run(
      [sys.executable, '-m', 'reformer_jax.evaluate', f'--workdir={chat_workdir}',
       '--data=sgd/test/dialogues_001.json.xz', '--max_dialogues=1', '--batch_size=8',
       '--max_reply_tokens=16'],
      capture_output=True, text=True, timeout=600, env=cli_env, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)  # stdout holds the JSON object and nothing else
  _check(result, data.load_dialogues(path)[:1])
  assert result['data'] == str(path)  # found under the shared data folder
  assert 'ETA' in proc.stderr


def test_text_scores_are_sacrebleu_and_rouge_l():
  same = evaluate.text_scores(['the hotel is in the north'], ['the hotel is in the north'])
  assert same['bleu'] == pytest.approx(100) and same['rouge_l'] == pytest.approx(100)
  assert 'tok:13a' in same['bleu_signature']
  none = evaluate.text_scores(['zebra'], ['the hotel is in the north'])
  assert none['bleu'] == 0 and none['rouge_l'] == 0


def test_bad_data_path_says_what_was_looked_for(chat_workdir):
  with pytest.raises(FileNotFoundError, match=r'Dialogue path .*no/such/corpus does not exist'):
    evaluate.run(evaluate.parse_args([f'--workdir={chat_workdir}', '--data=no/such/corpus']))


@pytest.fixture(scope='module')
def translation_workdir(tmp_path_factory, shared_data):
  """`configs/translation.py:tiny` trained for a few steps on Multi30k de-en."""
  from configs import translation  # pylint: disable=import-outside-toplevel
  from reformer_jax import train  # pylint: disable=import-outside-toplevel
  if not (shared_data / 'multi30k').is_dir():
    pytest.skip(f'multi30k is not staged in {shared_data}')
  config = translation.get_config('tiny')
  config.wandb.mode = 'disabled'
  config.data.data_dir = str(shared_data)
  config.num_train_steps = 6
  workdir = tmp_path_factory.mktemp('translation_tiny')
  train.train_and_evaluate(config, str(workdir))
  return workdir


def test_translation_task_reports_perplexity_and_bleu(translation_workdir):
  """--task=translation: teacher-forced perplexity and sacreBLEU of beam-search translations of
  the first Multi30k test pairs; greedy is beam 1; a dialogue model is refused with the fix."""
  flags = [f'--workdir={translation_workdir}', '--task=translation', '--max_pairs=6',
           '--batch_size=4', '--num_samples=2']
  beam = evaluate.run(evaluate.parse_args(flags + ['--strategy=beam', '--beam=2']))
  assert beam['task'] == 'translation' and beam['step'] == 6 and beam['n_pairs'] == 6
  assert beam['split'] == 'test' and beam['data'].endswith('multi30k')
  assert 1 < beam['perplexity'] < 1000 and 0 <= beam['bleu'] <= 100 and beam['n_tokens'] > 6
  assert beam['samples'][0]['reference'].startswith('A man in an orange hat')
  greedy = evaluate.run(evaluate.parse_args(flags))
  assert greedy['perplexity'] == pytest.approx(beam['perplexity'])  # scoring ignores decoding
  with pytest.raises(ValueError, match='beam or greedy'):
    evaluate.run(evaluate.parse_args(flags + ['--strategy=sample']))
  with pytest.raises(evaluate.inference.ModelLoadError, match="data.task='translation'"):
    evaluate.run(evaluate.parse_args([f'--workdir={translation_workdir}', '--max_dialogues=1']))


def test_scores_go_to_the_training_runs_wandb_summary(translation_workdir, monkeypatch, capsys):
  """--wandb: the finite numeric fields as `<split>/<field>` summary fields of the workdir's W&B
  run, opened with the run's own W&B settings; disabled (the default) opens no run."""
  opened = []

  class FakeWriter:
    def __init__(self, workdir, **kwargs):
      opened.append({'workdir': str(workdir), **kwargs, 'summary': {}, 'closed': False})

    def write_summary(self, values):
      opened[-1]['summary'].update(values)

    def close(self):
      opened[-1]['closed'] = True

  monkeypatch.setattr(evaluate.tracking, 'WandbWriter', FakeWriter)
  flags = [f'--workdir={translation_workdir}', '--task=translation', '--max_pairs=2',
           '--batch_size=2', '--strategy=greedy']
  assert evaluate.main(flags) == 0 and opened == []
  assert evaluate.main(flags + ['--wandb=offline']) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  (run,) = opened
  assert run['workdir'] == str(translation_workdir) and run['mode'] == 'offline' and run['closed']
  assert run['project'] == 'reformer-jax' and 'translation' in run['tags']
  summary = run['summary']
  assert summary['test/bleu'] == result['bleu'] and summary['test/step'] == 6
  assert summary['test/perplexity'] == result['perplexity'] and summary['test/strategy'] == 'greedy'
  assert not any(k.endswith(('/samples', '/decode', '/machine')) for k in summary)
