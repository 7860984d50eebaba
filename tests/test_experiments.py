"""The experiment scripts keep their output contract on tiny settings: JSON fields, notes, plots."""

import argparse
import json
import statistics
import sys
import types

import jax
import pytest

from experiments import attention_timing, common, memory

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
MACHINE_FIELDS = {'backend', 'device', 'jax_version', 'cpu', 'cpu_id', 'cpu_vector_isa', 'cpu_cores',
                  'ram_bytes', 'name', 'cpu_async_dispatch'}
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
    if on_disk['machine']['keeps_freed_memory']:  # full attention's worker leaves malloc as is
      assert p['keeps_freed_memory'] == (p['attention'] == 'lsh')
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
  # The chunk matmuls (LSH's own matmul shapes alone) are timed each round: the ceiling.
  chunk_rates = on_disk['chunk_matmuls']['samples_flops_per_s']
  assert len(chunk_rates) == 2 and on_disk['chunk_matmuls']['chunks'] == 512 // 32
  summary = on_disk['summary']
  assert summary['chunk_matmuls_flops_fraction'] == pytest.approx(max(chunk_rates) / max(rates))
  assert summary['lsh_flops_fraction_of_chunk_matmuls_median'] == pytest.approx(
      lsh[0]['flops'] / min(lsh[0]['fwd_bwd_samples_s']) / max(chunk_rates))
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
  assert spread['within_30pct_of_shortest']  # 1.0 and 1.2 times the 1K time per token
  slower = [point('fixed_tokens', 1024, 'lsh', 4, [1.0], batch=16),
            point('fixed_tokens', 4096, 'lsh', 4, [1.4], batch=4)]  # 1.4 times per token
  assert not attention_timing.summarize(slower, matmul_rates=[100.0], hashes=[4])[
      'lsh_time_per_token_spread_fixed_tokens']['lsh-4']['within_30pct_of_shortest']
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
      args, {'matmul': lambda: jax.numpy.ones(2)})
  assert oom['note'].startswith('skipped: out of memory')
  with pytest.raises(jax.errors.JaxRuntimeError, match='INTERNAL'):
    attention_timing.time_cases([(dict(oom, note=None), [('fwd_s', raises('INTERNAL: bug'))])],
                                args, {'matmul': lambda: jax.numpy.ones(2)})



@pytest.mark.parametrize('calls', [3, 1])
def test_a_sample_is_the_fastest_of_back_to_back_calls(monkeypatch, calls):
  argv = ['--lengths', '64', '--repeats', '2', '--out', '/dev/null']
  args = attention_timing.parse_args(argv + ([] if calls == 3 else ['--calls', '1']))
  assert args.calls == calls
  log = []
  durations = {'fwd_s': iter([9.0, 0.5, 0.3, 0.4, 0.2, 0.1, 0.6]), 'fwd_bwd_s': iter(range(9)),
               'matmul': iter(range(99))}  # seconds of each function's successive calls
  fns = [(name, lambda name=name: name) for name in ('fwd_s', 'fwd_bwd_s')]

  def time_call(fn):
    name = fn()
    log.append(name)
    return float(next(durations[name]))
  monkeypatch.setattr(attention_timing.common, 'time_call', time_call)
  point = {'note': None, 'batch': 1, 'length': 64, 'fwd_samples_s': [], 'fwd_bwd_samples_s': [],
           'fwd_rounds': [], 'fwd_bwd_rounds': []}
  attention_timing.time_cases([(point, fns)], args, {'matmul': lambda: 'matmul'})
  functions = [name for name in log if name != 'matmul']
  assert functions == ['fwd_s', 'fwd_bwd_s'] + (['fwd_s'] * calls + ['fwd_bwd_s'] * calls) * 2
  # After the warm-up (9 s): the fastest of each round's back-to-back calls.
  assert point['fwd_samples_s'] == ([0.3, 0.1] if calls == 3 else [0.5, 0.3])
  assert point['fwd_rounds'] == [0, 1]


def test_each_attention_kind_is_timed_in_its_own_process(tmp_path, monkeypatch):
  # The local attention worker dies before round 2: its points keep round 1 with a note, while
  # LSH's worker (another process) goes on; --one-process times the same points in one process.
  round_ = attention_timing.Worker.round

  def dies(self, r):
    if self.group == 'local' and r == 1:
      self.proc.kill()
      self.proc.wait()
    return round_(self, r)
  monkeypatch.setattr(attention_timing.Worker, 'round', dies)
  argv = ['--lengths', '64', '--hashes', '1', '--tokens', '64', '--repeats', '2', '--regimes',
          'batch1', '--attention', 'local', 'lsh', '--chunk-len', '32', '--heads', '1',
          '--head-dim', '16', '--matmul-size', '64']
  result = attention_timing.main(argv + ['--out', str(tmp_path / 'a.json')])
  local, lsh = result['points']
  assert (local['attention'], lsh['attention']) == ('local', 'lsh')
  assert local['fwd_bwd_rounds'] == [0] and local['repeats'] == 1 and local['fwd_bwd_s'] > 0
  assert 'worker process exited with code -9 in round 2' in local['note']
  assert lsh['fwd_bwd_rounds'] == [0, 1] and lsh['note'] is None
  assert len(result['matmul']['samples_flops_per_s']) == 2
  one = attention_timing.main(argv + ['--one-process', '--out', str(tmp_path / 'b.json')])
  assert [(p['attention'], p['fwd_bwd_rounds'], p['note']) for p in one['points']] == [
      ('local', [0, 1], None), ('lsh', [0, 1], None)]
  assert {p['keeps_freed_memory'] for p in one['points']} == {one['machine']['keeps_freed_memory']}


def test_a_compile_out_of_memory_is_a_skipped_point(monkeypatch):
  # A GPU compiler's autotuner can run out of memory while compiling a too-large full attention.
  args = attention_timing.parse_args(['--lengths', '64', '--attention', 'full', 'local',
                                      '--regimes', 'batch1', '--out', '/dev/null'])
  compile_ = attention_timing._compile

  def fake(fn, *shapes):
    if shapes[0].shape[1] == 64 and fake.calls == 0:
      fake.calls += 1
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to '
                                       'allocate 32.02GiB with allocator GPU_0_bfc')
    return compile_(fn, *shapes)
  fake.calls = 0
  monkeypatch.setattr(attention_timing, '_compile', fake)
  (full, full_fns), (local, local_fns) = attention_timing.prepare(args, 64, 1, 'batch1')
  assert full['note'].startswith('skipped: out of memory while compiling') and full_fns == []
  assert local['note'] is None and [name for name, _ in local_fns] == ['fwd_s', 'fwd_bwd_s']


def test_training_curves(tmp_path, capsys):
  from experiments import training_curves  # pylint: disable=import-outside-toplevel
  runs = {'a': [5.0, 4.0, 4.5], 'b': [6.0, 5.0, 4.8]}
  for name, values in runs.items():
    (tmp_path / name).mkdir()
    lines = [{'step': 0, 'num_params': 10}]
    for i, v in enumerate(values, 1):
      lines += [{'step': 100 * i, 'train/loss': 3.0 / i}, {'step': 100 * i, 'eval/perplexity': v}]
    (tmp_path / name / 'metrics.jsonl').write_text('\n'.join(json.dumps(x) for x in lines) + '\n')
  evaluation = tmp_path / 'a_test.json'
  evaluation.write_text(json.dumps({'step': 300, 'bleu': 30.5, 'perplexity': 4.6, 'split': 'test',
                                    'machine': common.machine_info()}))
  out = tmp_path / 'curves.json'
  training_curves.main(['--run', f'a={tmp_path / "a"}', '--run', f'b={tmp_path / "b" / "metrics.jsonl"}',
                        '--eval', f'a={evaluation}', '--out', str(out)])
  result = json.loads(out.read_text())
  a, b = result['runs']['a'], result['runs']['b']
  assert a['steps'] == [100, 200, 300] and a['eval/perplexity'] == [5.0, 4.0, 4.5]
  assert (a['best_step'], a['best'], a['final_step']) == (200, 4.0, 300)
  assert (b['best_step'], b['test']) == (300, None)
  assert a['test']['bleu'] == 30.5 and result['machine']['backend'] == 'cpu'
  assert a['train/loss'] == [3.0, 1.5, 1.0]
  assert _png(out.with_suffix('.png'))
  assert '| a | 300 |' in capsys.readouterr().out
  with pytest.raises(SystemExit, match='no --run named'):
    training_curves.main(['--run', f'a={tmp_path / "a"}', '--eval', f'c={evaluation}',
                          '--out', str(out)])
  with pytest.raises(SystemExit, match='no metrics.jsonl'):
    training_curves.main(['--run', f'a={tmp_path / "missing"}', '--out', str(out)])
  assert result['groups'] == {}  # no GROUP/LABEL names
  # Seeds of one setting, named GROUP/LABEL: mean and sample std per group.
  b_eval = tmp_path / 'b_test.json'
  b_eval.write_text(json.dumps({'step': 300, 'bleu': 31.5}))
  result = training_curves.main([
      '--run', f'x/s0={tmp_path / "a"}', '--run', f'x/s1={tmp_path / "b"}', '--run',
      f'y/s0={tmp_path / "b"}', '--run', f'c={tmp_path / "a"}', '--eval', f'x/s0={evaluation}',
      '--eval', f'x/s1={b_eval}', '--out', str(out)])
  x, y = result['groups']['x'], result['groups']['y']
  assert set(result['groups']) == {'x', 'y'} and x['runs'] == ['x/s0', 'x/s1']
  assert (x['n'], x['bleu_n'], y['n'], y['bleu_n']) == (2, 2, 1, 0)
  assert x['best_mean'] == pytest.approx(4.4) and x['best_std'] == pytest.approx(0.32 ** 0.5)
  assert x['bleu_mean'] == pytest.approx(31.0) and x['bleu_std'] == pytest.approx(0.5 ** 0.5)
  assert (y['best_mean'], y['best_std'], y['bleu_mean']) == (4.8, None, None)
  assert '| x | 2 | 4.400 ± 0.566 | 31.000 ± 0.707 |' in capsys.readouterr().out

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


def test_memory_depth_ratio_without_parameters():
  # 12 vs 2 layers: 1.5x in all, but 1.1x once float32 parameters and gradients are set aside.
  def point(layers, compiled, params):
    return dict(sweep='depth', variant='reformer', n_layers=layers, compiled_bytes=compiled,
                rss_step_bytes=None, n_params=params)
  summary = memory.summarize([point(2, 1000, 25), point(12, 1500, 75)],
                             argparse.Namespace(variants=['reformer']))
  ratios = summary['depth_ratio_12_vs_2']['reformer']
  assert ratios['compiled_bytes'] == pytest.approx(1.5)
  assert ratios['compiled_bytes_beyond_parameters'] == pytest.approx(900 / 800)


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


def test_op_times_run_to_the_completion_marker():
  """A matmul handed to the thread pool (its event closes at once) lasts until its `end:`
  marker, each execution closed by its own; other ops last their events, however late their
  markers (they waited for a thread)."""
  lines = {'dot.1': '%dot.1 = f32[8,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}',
           'add.2': '%add.2 = f32[8]{0} add(%a, %b)'}
  events = [('dot.1', 0, 100), ('ThunkExecutor::Execute', 0, 5000), ('end: dot.1', 1000, 0),
            ('dot.1', 3000, 50), ('end: dot.1', 3400, 0),      # a second run, its own marker
            ('add.2', 2000, 300), ('end: add.2', 2900, 0),     # waited: still 300
            ('add.2', 5000, 200)]                              # no marker
  rows = {r['op']: r['ms'] for r in common._op_rows(events, lines, {}, steps=1)}
  assert rows == pytest.approx({'dot.1': 1400 / 1e6, 'add.2': 500 / 1e6})


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
  assert set(row['eval']) == {'full', 'full_self', 'lsh1', 'lsh2', 'lsh4', 'lsh8'}
  assert all(0.0 <= v <= 1.0 for v in row['eval'].values())
  assert on_disk['config']['w_length'] == 7 and on_disk['config']['chunk_len'] == 4
  assert ('| train \\ eval | full | full_self | lsh1 | lsh2 | lsh4 | lsh8 |'
          in out.with_suffix('.md').read_text())
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


# ---------------------------------------------------------------------------------------------
# experiments/peers.py

PEER_FIELDS = {'implementation', 'tokens_per_s', 'step_s', 'peak_rss_bytes', 'params', 'note'}
RATIO_FIELDS = {'tokens_per_s_vs_fastest_peer', 'peak_memory_vs_smallest_peer', 'fastest_peer',
                'smallest_peer', 'meets_target'}
# The child processes inherit it: XLA compiles at -O0, in half the time (timings are not checked).
FAST_COMPILE = '--xla_backend_optimization_level=0'
TINY_PEERS = ['--layers', '1', '--d-model', '32', '--d-ff', '64', '--heads', '2', '--hashes', '1',
              '--chunk', '8', '--length', '64', '--vocab', '32', '--steps', '2']


def _check_peers_json(out, implementations):
  on_disk = json.loads(out.read_text())
  assert MACHINE_FIELDS <= set(on_disk['machine']) and 'torch_version' in on_disk['machine']
  cfg = on_disk['config']
  assert (cfg['layers'], cfg['d_model'], cfg['length'], cfg['chunk']) == (1, 32, 64, 8)
  assert cfg['axial_shape'] == [8, 8] and cfg['axial_dims'] == [16, 16]
  assert cfg['buckets'] == [4, 4]  # 2 * 64 / 8 = 16 buckets > chunk 8: factorized
  assert [p['implementation'] for p in on_disk['points']] == implementations
  assert RATIO_FIELDS <= set(on_disk['ratios'])
  assert _png(out.with_suffix('.png'))
  for p in on_disk['points']:
    assert PEER_FIELDS <= set(p), p
    assert p['note'] is None, p
    assert p['tokens_per_s'] == pytest.approx(64 / p['step_s'])
    assert p['peak_rss_bytes'] >= p['runtime_rss_bytes'] > 0
    assert p['peak_rss_with_warmup_bytes'] >= p['runtime_rss_bytes']
    assert all(len(s) == 2 for s in p['step_samples_s'])
    assert (p['compile_s'] is not None) == (p['implementation'] == 'reformer_jax')
  return on_disk


def test_peers_contract_reformer_jax(tmp_path, monkeypatch):
  """reformer_jax alone: the JSON contract holds, and with no peer the ratios are empty."""
  from experiments import peers  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('XLA_FLAGS', FAST_COMPILE)
  out = tmp_path / 'peers.json'
  result = peers.main([*TINY_PEERS, '--repeats', '1', '--implementations', 'reformer_jax',
                       '--out', str(out)])
  on_disk = _check_peers_json(out, ['reformer_jax'])
  assert on_disk['points'] == json.loads(json.dumps(result['points']))
  (point,) = on_disk['points']
  # Token embedding, axial table, one block (LayerNorms, qk, value, out, FF), final norm, logits.
  d, f, v = 32, 64, 32
  assert point['params'] == (v * d + 2 * 8 * 16 + 2 * d + 3 * d * d + 2 * d + 2 * d * f + f + d
                             + 2 * d + d * v + v)
  assert point['versions']['jax'] == jax.__version__
  assert on_disk['ratios']['tokens_per_s_vs_fastest_peer'] is None
  out.with_suffix('.png').unlink()
  peers.main(['--replot', '--out', str(out)])
  assert _png(out.with_suffix('.png'))


def test_attention_timing_profile(tmp_path):
  attention_timing.main(['--profile', '--lengths', '128', '--hashes', '2', '--heads', '1',
                         '--head-dim', '16', '--chunk-len', '32', '--out',
                         str(tmp_path / 'timing.json')])
  (prof,) = json.loads((tmp_path / 'timing_profile.json').read_text())['profiles']
  assert (prof['length'], prof['n_hashes'], prof['batch']) == (128, 2, 1)
  assert prof['categories_ms']['matmul'] > 0 and prof['categories_ms']['sort'] > 0
  assert sum(prof['categories_ms'].values()) == pytest.approx(prof['total_ms'])


def test_peers_profile_of_the_reformer_jax_step(tmp_path):
  from experiments import peers  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'peers.json'
  result = peers.main([*TINY_PEERS, '--profile', '--out', str(out)])
  on_disk = json.loads((tmp_path / 'peers_profile.json').read_text())
  assert on_disk['config']['layers'] == 1 and on_disk['config']['implementation'] == 'reformer_jax'
  assert on_disk['total_ms'] == pytest.approx(result['total_ms']) and result['total_ms'] > 0
  assert on_disk['categories_ms']['matmul'] > 0  # projections, chunk attention, feed-forward
  assert sum(on_disk['categories_ms'].values()) == pytest.approx(on_disk['total_ms'])
  assert not out.exists()  # the comparison itself did not run


def test_peers_interleaving_medians_and_ratios(monkeypatch):
  """Rounds rotate the order; a peer that did not run gets a note and is not retried; medians
  over repeats and the ratios against the fastest and the smallest peer."""
  from experiments import peers  # pylint: disable=import-outside-toplevel
  calls = []
  steps = {'reformer_jax': [1.0, 2.0], 'transformers': [4.0, 6.0], 'reformer_pytorch': None}

  def fake(spec, *, timeout_s):
    name = spec['implementation']
    calls.append(name)
    if steps[name] is None:
      return {'implementation': name, 'note': 'skipped: reformer_pytorch is not importable'}
    repeat = sum(c == name for c in calls)
    return {'implementation': name, 'step_samples_s': [s * repeat for s in steps[name]],
            'peak_rss_bytes': 100 * repeat if name == 'reformer_jax' else 400,
            'runtime_rss_bytes': 50, 'peak_rss_with_warmup_bytes': 500, 'params': 10,
            'compile_s': 3.0 if name == 'reformer_jax' else None, 'warmup_s': [9.0],
            'loss': 1.0, 'versions': {}}

  monkeypatch.setattr(peers, 'run_process', fake)
  args = peers.parse_args([*TINY_PEERS, '--repeats', '3', '--out', '/dev/null'])
  runs = peers.interleaved(args, peers.model_spec(args))
  assert calls == ['reformer_jax', 'transformers', 'reformer_pytorch',
                   'transformers', 'reformer_jax', 'reformer_jax', 'transformers']
  spec = peers.model_spec(args)
  points = [peers.summarize_runs(name, runs[name], spec) for name in args.implementations]
  ours, hf, missing = points
  assert ours['step_s'] == 3.0 and ours['tokens_per_s'] == pytest.approx(64 / 3.0)  # 1.5, 3, 4.5
  assert ours['peak_rss_bytes'] == 300 and ours['peak_above_runtime_bytes'] == 250
  assert ours['repeats'] == 3 and ours['compile_s'] == 3.0
  assert hf['step_s'] == 10.0 and hf['compile_s'] is None
  assert missing['tokens_per_s'] is None and missing['note'].startswith('skipped')
  r = peers.ratios(points)
  assert r['fastest_peer'] == r['smallest_peer'] == 'transformers'
  assert r['tokens_per_s_vs_fastest_peer'] == pytest.approx(10.0 / 3.0)
  assert r['peak_memory_vs_smallest_peer'] == pytest.approx(300 / 400)
  assert r['peak_above_runtime_vs_smallest_peer'] == pytest.approx(250 / 350)
  assert r['meets_target'] is False  # 0.75x the memory: above the 0.7x target


def test_peer_steps_notes_a_missing_framework(monkeypatch):
  from experiments import peer_steps  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(sys.modules, 'torch', None)  # importing torch now fails
  out = peer_steps.measure({'implementation': 'transformers', 'steps': 1, 'threads': 1,
                            'seed': 0})
  assert out['note'].startswith('skipped: transformers is not importable')
  assert "pip install -e '.[peers]'" in out['note']


def test_peers_arguments_are_checked():
  from experiments import peers  # pylint: disable=import-outside-toplevel
  assert peers.axial_shape(4096) == (64, 64) and peers.axial_shape(2048) == (64, 32)
  assert peers.axial_shape(96) == (12, 8)
  for bad in (['--length', '100', '--chunk', '64'], ['--d-ff', '300', '--d-model', '256'],
              ['--d-model', '30', '--heads', '4']):
    with pytest.raises(SystemExit):
      peers.parse_args(bad)


@pytest.mark.slow
def test_peers_against_pytorch_peers(tmp_path, monkeypatch):
  """All three implementations at tiny sizes (needs the peers extra: pip install -e '.[peers]')."""
  for module in ('torch', 'transformers', 'reformer_pytorch'):
    pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[peers]'")
  from experiments import peers  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('XLA_FLAGS', FAST_COMPILE)
  out = tmp_path / 'peers.json'
  peers.main([*TINY_PEERS, '--repeats', '2', '--out', str(out)])
  on_disk = _check_peers_json(out, ['reformer_jax', 'transformers', 'reformer_pytorch'])
  params = {p['implementation']: p['params'] for p in on_disk['points']}
  # Same model up to Hugging Face's 2 * d_model-wide head and reformer_pytorch's output bias.
  d, v = 32, 32
  assert params['transformers'] == params['reformer_jax'] + d * v + 2 * d
  assert params['reformer_pytorch'] == params['reformer_jax'] + d
  r = on_disk['ratios']
  assert r['fastest_peer'] in params and r['smallest_peer'] in params
  assert r['tokens_per_s_vs_fastest_peer'] > 0 and r['peak_memory_vs_smallest_peer'] > 0
  assert isinstance(r['meets_target'], bool)


def test_cudnn_attention_is_a_note_off_gpu(tmp_path):
  """`--attention cudnn` times cuDNN flash attention on a GPU; elsewhere its points carry a
  note and the run goes on. The default list includes it only on a GPU."""
  out = tmp_path / 't.json'
  attention_timing.main(['--lengths', '64', '--hashes', '1', '--tokens', '64', '--repeats', '1',
                         '--attention', 'cudnn', 'lsh', '--regimes', 'batch1', '--chunk-len', '32',
                         '--out', str(out)])
  points = {p['attention']: p for p in json.loads(out.read_text())['points']}
  if jax.default_backend() != 'gpu':
    assert points['cudnn']['fwd_bwd_s'] is None and 'cuDNN' in points['cudnn']['note']
    assert 'cudnn' not in attention_timing.parse_args([]).attention
  assert points['lsh']['fwd_bwd_s'] > 0
