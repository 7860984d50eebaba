"""Attention timing sweep: sequence length x attention type (full, local, LSH) x LSH hash rounds.

    python -m launch.sweep launch/sweeps/attention_timing.py          # TPU or GPU: 1K..64K tokens
    python -m launch.sweep launch/sweeps/attention_timing.py:quick    # CPU check, a few minutes

One run of `experiments/attention_timing.py` per point (the hash rounds only for LSH), each
writing `<workdir>/timing.json` (that script's schema: forward and forward+backward seconds per
regime) and its plot; the sweep summary lists the forward+backward time of every point. Within a
run the script times its variants interleaved; across runs, keep the machine otherwise idle.
"""

from launch.sweep import Sweep

LENGTHS = ('1K', '2K', '4K', '8K', '16K', '32K', '64K')
HASHES = (1, 2, 4, 8)


def get_sweep(arg: str = '') -> Sweep:
  if arg not in ('', 'quick'):
    raise ValueError(f"launch/sweeps/attention_timing.py:{arg}: use no argument or ':quick'")
  quick = arg == 'quick'
  lengths, hashes = (('1K', '2K'), (1, 4)) if quick else (LENGTHS, HASHES)
  tokens, repeats = ('4K', 2) if quick else ('64K', 5)  # fixed_tokens regime: batch * length
  points = []
  for length in lengths:
    points += [{'lengths': length, 'attention': 'full'}, {'lengths': length, 'attention': 'local'}]
    points += [{'lengths': length, 'attention': 'lsh', 'hashes': h} for h in hashes]
  return Sweep(
      name='attention_timing_quick' if quick else 'attention_timing',
      command=('{python}', '-m', 'experiments.attention_timing', f'--tokens={tokens}',
               f'--repeats={repeats}', '--out={workdir}/timing.json'),
      points=points,
      summarize=timing_summary)


def timing_summary(workdir):
  """`{regime}/fwd_bwd_s` of each point of the run's timing.json (None where it was skipped)."""
  import json  # pylint: disable=import-outside-toplevel
  result = json.loads((workdir / 'timing.json').read_text())
  return {f"{p['regime']}/fwd_bwd_s": p['fwd_bwd_s'] for p in result['points']}
