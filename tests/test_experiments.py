"""The experiment scripts keep their output contract on tiny settings: JSON fields, notes, plots."""

import json
import statistics
import sys
import types

import jax
import pytest

from experiments import attention_timing, common, memory

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
MACHINE_FIELDS = {'backend', 'device', 'jax_version', 'cpu', 'cpu_cores', 'ram_bytes', 'name'}
TIMING_FIELDS = {'length', 'batch', 'attention', 'n_hashes', 'fwd_s', 'fwd_bwd_s', 'compiled_bytes',
                 'note', 'compile_s', 'regime', 'flops', 'flops_fraction', 'time_per_token_s'}
MEMORY_FIELDS = {'sweep', 'variant', 'n_layers', 'length', 'compiled_bytes', 'compiled_temp_bytes',
                 'rss_peak_bytes', 'rss_step_bytes', 'device_peak_bytes', 'step_s', 'note'}


def _png(path):
  with open(path, 'rb') as f:
    return f.read(8) == PNG_MAGIC


def test_sizes_parse():
  assert common.size_list(['1K', '2k,4096', '1M']) == [1024, 2048, 4096, 2 ** 20]
  assert common.human(65536) == '64K' and common.human(1536) == '1536'
  with pytest.raises(ValueError, match='not a size'):
    common.parse_size('4KB')


def test_attention_timing_contract(tmp_path):
  out = tmp_path / 'timing.json'
  # Full attention at 512 tokens (6 MiB compiled: logits and their gradients) exceeds the 3 MiB
  # limit and must be skipped with a note; LSH (under 1 MiB) runs. With 512 tokens in all, both
  # regimes are batch 1: one measurement, reported under each.
  result = attention_timing.main([
      '--lengths', '512', '--hashes', '1', '--tokens', '512', '--repeats', '2',
      '--attention', 'full', 'lsh', '--heads', '1', '--head-dim', '16', '--chunk-len', '32',
      '--max-bytes', '3M', '--out', str(out)])
  on_disk = json.loads(out.read_text())
  assert on_disk['points'] == json.loads(json.dumps(result['points']))
  assert MACHINE_FIELDS <= set(on_disk['machine'])
  assert on_disk['machine']['jax_version'] == jax.__version__
  assert on_disk['matmul_flops_per_s'] > 0
  assert _png(out.with_suffix('.png'))

  points = on_disk['points']
  assert sorted((p['regime'], p['attention']) for p in points) == [
      ('batch1', 'full'), ('batch1', 'lsh'), ('fixed_tokens', 'full'), ('fixed_tokens', 'lsh')]
  for p in points:
    assert TIMING_FIELDS <= set(p), p
    assert p['length'] == 512 and p['batch'] == 1
    assert (p['n_hashes'] is None) == (p['attention'] == 'full')
    assert p['compiled_bytes'] > 0 and p['compile_s'] > 0
    if p['attention'] == 'full':
      assert p['fwd_s'] is None and p['fwd_bwd_s'] is None and p['flops_fraction'] is None
      assert p['note'].startswith('skipped') and 'limit' in p['note']
    else:
      assert p['note'] is None
      assert 0 < p['fwd_s'] and 0 < p['fwd_bwd_s'] and p['repeats'] == 2
      assert p['flops'] == 12 * 1 * 512 * 1 * 16 * 64  # 12 R L N H K, K = 2 chunks of 32
      rates = on_disk['matmul']['samples_flops_per_s']  # one per round
      assert p['fwd_bwd_rounds'] == [0, 1]
      per_round = [p['flops'] / t / rates[r]
                   for r, t in zip(p['fwd_bwd_rounds'], p['fwd_bwd_samples_s'])]
      assert p['flops_fraction_paired'] == pytest.approx(statistics.median(per_round))
      assert p['flops_fraction'] == pytest.approx(
          p['flops'] / min(p['fwd_bwd_samples_s']) / max(rates))
      assert p['time_per_token_s'] == pytest.approx(p['fwd_bwd_s'] / 512)
  lsh = [p for p in points if p['attention'] == 'lsh']
  assert lsh[0]['fwd_bwd_samples_s'] == lsh[1]['fwd_bwd_samples_s']
  assert '| 512 | 1 | - |' in attention_timing.tables(on_disk)  # full skipped, lsh measured

  out.with_suffix('.png').unlink()  # --replot redraws from the JSON alone
  attention_timing.main(['--replot', '--out', str(out)])
  assert _png(out.with_suffix('.png'))


def test_timing_summary_pairs_samples_by_round():
  # Round 1 ran under 4x the load of round 0 (its matmul was 4x slower): ratios within a round
  # are unaffected, while a point timed only in round 1 would look 4x slower by its median.
  def point(regime, length, attention, n_hashes, samples, batch=1):
    return dict(regime=regime, length=length, batch=batch, attention=attention,
                n_hashes=n_hashes, fwd_bwd_samples_s=samples,
                fwd_bwd_rounds=list(range(len(samples))),
                fwd_bwd_s=None if not samples else sorted(samples)[len(samples) // 2],
                flops=10.0, time_per_token_s=None if not samples else
                sorted(samples)[len(samples) // 2] / (batch * length))
  points = [point('batch1', 16384, 'full', None, [30.0]),
            point('batch1', 16384, 'lsh', 4, [2.0, 8.0]),
            point('fixed_tokens', 1024, 'lsh', 4, [1.0, 4.0], batch=16),
            point('fixed_tokens', 4096, 'lsh', 4, [1.2, 4.8], batch=4),
            point('fixed_tokens', 16384, 'lsh', 4, [])]  # skipped: ignored
  summary = attention_timing.summarize(points, matmul_rates=[100.0, 25.0], hashes=[4])
  assert summary['lsh_vs_full_fwd_bwd_speedup_batch1'] == {'lsh-4': {'16K': 15.0}}
  assert summary['lsh_vs_full_fwd_bwd_speedup_batch1_best'] == {'lsh-4': {'16K': 15.0}}
  spread = summary['lsh_time_per_token_spread_fixed_tokens']['lsh-4']
  assert spread['lengths'] == '1K..4K'
  assert spread['max_over_min_minus_1'] == pytest.approx(0.2)
  assert spread['max_over_min_minus_1_best'] == pytest.approx(0.2)
  assert points[1]['flops_fraction'] == pytest.approx(10.0 / 2.0 / 100.0)  # best vs best
  assert points[1]['flops_fraction_paired'] == pytest.approx(0.05)  # both rounds agree
  assert summary['lsh_flops_fraction_range'] == pytest.approx([0.05, 0.1])
  assert summary['matmul_flops_per_s_range'] == [25.0, 100.0]


def test_timing_survives_out_of_memory_and_reraises_other_errors():
  args = attention_timing.parse_args(['--lengths', '64', '--repeats', '1', '--out', '/dev/null'])

  def raises(message):
    def fn():
      raise jax.errors.JaxRuntimeError(message)
    return fn

  oom = {'note': None, 'batch': 1, 'length': 64, 'fwd_samples_s': [], 'fwd_bwd_samples_s': [],
         'fwd_rounds': [], 'fwd_bwd_rounds': []}
  attention_timing.time_cases(
      [(oom, [('fwd_s', raises('RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes'))])],
      args, lambda: jax.numpy.ones(2))
  assert oom['note'].startswith('skipped: out of memory')
  with pytest.raises(jax.errors.JaxRuntimeError, match='INTERNAL'):
    attention_timing.time_cases([(dict(oom, note=None), [('fwd_s', raises('INTERNAL: bug'))])],
                                args, lambda: jax.numpy.ones(2))


def test_memory_contract(tmp_path, monkeypatch):
  # Two layers count as too slow to run: those points keep their compiled analysis and a note.
  monkeypatch.setattr(memory, 'estimated_step_s', lambda p, _: 1e9 if p['n_layers'] == 2 else 0.0)
  out = tmp_path / 'memory.json'
  result = memory.main([
      '--variants', 'standard', '--depths', '1', '2',
      '--depth-length', '64', '--lengths', '64', '--length-layers', '1', '--d-model', '32',
      '--d-ff', '64', '--heads', '2', '--vocab-size', '32', '--ff-chunk-len', '32',
      '--out', str(out)])
  on_disk = json.loads(out.read_text())
  assert MACHINE_FIELDS <= set(on_disk['machine'])
  assert _png(out.with_suffix('.png'))
  assert on_disk['headline'] is None

  points = on_disk['points']
  assert len(points) == len(result['points']) == 3  # 2 depths + 1 length
  for p in points:
    assert MEMORY_FIELDS <= set(p), p
    assert p['compiled_bytes'] > 0 and p['compiled_temp_bytes'] >= 0
    if p['n_layers'] == 2:
      assert p['step_s'] is None and p['rss_step_bytes'] is None
      assert p['note'].startswith('not run: estimated')
    else:
      assert p['note'] is None, p
      assert p['step_s'] > 0 and p['rss_peak_bytes'] > 0 and p['rss_step_bytes'] >= 0
  assert {p['variant'] for p in points} == {'standard'}
  depth = {(p['variant'], p['n_layers']): p for p in points if p['sweep'] == 'depth'}
  assert depth['standard', 2]['n_params'] > depth['standard', 1]['n_params']
  assert depth['standard', 2]['compiled_bytes'] > depth['standard', 1]['compiled_bytes']
  # The same configuration in both sweeps is measured once.
  length = {p['variant']: p for p in points if p['sweep'] == 'length'}
  assert length['standard']['rss_step_bytes'] == depth['standard', 1]['rss_step_bytes']
  out.with_suffix('.png').unlink()
  memory.main(['--replot', '--out', str(out)])
  assert _png(out.with_suffix('.png'))
  ratio = on_disk['summary']['depth_ratio_max_vs_min']['standard']['compiled_bytes']
  assert ratio == pytest.approx(depth['standard', 2]['compiled_bytes']
                                / depth['standard', 1]['compiled_bytes'])


def test_hlo_op_categories():
  bodies = {'fused_dot': '%d = f32[2,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}\n',
            'fused_red': '%r = f32[2]{0} reduce(%a, %c), dimensions={1}\n'}
  def line(rhs):
    return f'%x = {rhs}'
  assert common.categorize('ynn_fusion.3', line(
      'f32[2,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot'), bodies) == 'matmul'
  assert common.categorize('ynn_fusion', line(
      'f32[2]{0} fusion(%a), kind=kCustom, calls=%fused_red'), bodies) == 'reduce'
  assert common.categorize('sort.2', line(
      '(s32[4]{0}, s32[4]{0}) sort(%k, %i), dimensions={0}'), bodies) == 'sort'
  assert common.categorize('bitcast_gather_fusion.1', line(
      'f32[4]{0} fusion(%a, %i), kind=kLoop, calls=%f'), bodies) == 'gather'
  assert common.categorize('copy_bitcast_fusion', line(
      'f32[4]{0} fusion(%a), kind=kLoop, calls=%f'), bodies) == 'copy'
  assert common.categorize('subtract_exponential_fusion', line(
      'f32[4]{0} fusion(%a), kind=kLoop, calls=%f'), bodies) == 'elementwise'


def test_wandb_is_optional_and_logs_table_plot_summary(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # importing wandb now fails
  assert common.log_to_wandb('disabled', job='j', config={}, rows=[], columns=[], images={},
                             summary={}) is None

  calls = {}
  class Run:
    summary = {}
    def log(self, values):
      calls['log'] = values
    def finish(self):
      calls['finished'] = True
  def init(**kwargs):
    calls['init'] = kwargs
    return Run()
  fake = types.SimpleNamespace(
      init=init, Table=lambda columns, data: ('table', columns, data),
      Image=lambda path: ('image', path))
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  png = tmp_path / 'p.png'
  mode = common.log_to_wandb('offline', job='timing', config={'a': 1},
                             rows=[{'x': 1, 'y': None}], columns=['x', 'y'],
                             images={'plot': png}, summary={'speedup': 2.5, 'nan': float('nan')})
  assert mode == 'offline' and calls['init']['mode'] == 'offline' and calls['finished']
  assert calls['log']['timing/table'] == ('table', ['x', 'y'], [[1, None]])
  assert calls['log']['timing/plot'] == ('image', str(png))
  assert Run.summary == {'timing/speedup': 2.5}


def test_duplication_table(tmp_path, capsys):
  """experiments/duplication.py: trains, evaluates with every hash count, writes the table; a
  rerun resumes the finished run instead of training again."""
  from experiments import duplication  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'dup.json'
  argv = ['--train', 'lsh2', '--length', '16', '--steps', '2', '--batch', '4',
          '--eval-examples', '8', '--d-model', '16', '--heads', '2', '--fast-compile',
          '--workdir', str(tmp_path / 'runs'), '--out', str(out)]
  result = duplication.main(argv)
  on_disk = json.loads(out.read_text())
  assert on_disk['rows'] == result['rows'] and len(on_disk['rows']) == 1
  row = on_disk['rows'][0]
  assert row['train'] == 'lsh2' and row['step'] == 2
  assert set(row['eval']) == {'full', 'lsh1', 'lsh2', 'lsh4', 'lsh8'}
  assert all(0.0 <= v <= 1.0 for v in row['eval'].values())
  assert on_disk['config']['w_length'] == 7 and on_disk['config']['chunk_len'] == 4
  assert '| train \\ eval | full | lsh1 | lsh2 | lsh4 | lsh8 |' in out.with_suffix('.md').read_text()
  assert _png(out.with_suffix('.png'))
  again = duplication.main(argv)  # finished: evaluates the checkpoint, same step
  assert again['rows'][0]['step'] == 2
  assert again['rows'][0]['eval']['full'] == row['eval']['full']  # full attention: deterministic


def test_duplication_paper_setting_config():
  """--length 1024 gives the paper's setting: chunk 64, |w| = 511, valid model config."""
  from experiments import duplication  # pylint: disable=import-outside-toplevel
  from reformer_jax import train  # pylint: disable=import-outside-toplevel
  args = duplication.parse_args(['--length', '1024'])
  config = duplication.run_config(args, 'lsh4')
  assert args.chunk_len == 64 and config.data.seq_len == 1024 and config.model.n_hashes == 4
  assert config.eval_n_hashes == (1, 2, 4, 8, 0)
  train.validate_config(config)
  with pytest.raises(SystemExit):
    duplication.parse_args(['--length', '100', '--chunk-len', '64'])
