"""launch/: the sweep runner (grid, names, resume-skip, interruption, W&B agent runs, a tiny real
training grid) and the exact commands `launch.tpu_vm --dry-run` prints. Nothing here needs gcloud,
ssh or a network: TPU and ssh commands are only printed, never run.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # launch/ and configs/ live beside the package
  sys.path.insert(0, str(REPO))

from launch import sweep as sweep_lib  # noqa: E402
from launch import tpu_vm  # noqa: E402

PY = sys.executable
# A stand-in for a run: appends its argv to <workdir>/calls; exits 1 while <workdir>/../FAIL
# names this run; with --steps=N writes a trainer-like config.json and metrics.jsonl.
FAKE_RUN = textwrap.dedent('''
    import json, pathlib, sys
    workdir = pathlib.Path(sys.argv[1]); workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / 'calls', 'a') as f: f.write(' '.join(sys.argv[2:]) + '\\n')
    fail = workdir.parent / 'FAIL'
    if fail.exists() and workdir.name in fail.read_text().split(): sys.exit(1)
    for arg in sys.argv[2:]:
      if arg.startswith('--steps='):
        (workdir / 'config.json').write_text(json.dumps({'num_train_steps': 10}))
        with open(workdir / 'metrics.jsonl', 'a') as f:
          f.write(json.dumps({'step': int(arg[8:]), 'train/loss': 1.5}) + '\\n')
''')


def write_sweep(path: pathlib.Path, points: str, script: str = FAKE_RUN) -> pathlib.Path:
  """A sweep file running `script` (saved beside it): `python <script> <workdir> --key=value...`."""
  program = path.with_name(path.stem + '_run.py')
  program.write_text(script)
  path.write_text(textwrap.dedent(f'''
      from launch.sweep import Sweep
      def get_sweep(arg=''):
        return Sweep(name='fake', command=('{{python}}', {str(program)!r}, '{{workdir}}'),
                     points={points})
  '''))
  return path


def calls(root: pathlib.Path, name: str) -> list[str]:
  path = root / name / 'calls'
  return path.read_text().splitlines() if path.exists() else []


def statuses(root: pathlib.Path) -> dict[str, str]:
  return {r['name']: r['status'] for r in json.loads((root / 'summary.json').read_text())}


# --------------------------------------------------------------------------- sweep: planning


def test_grid_names_and_arguments():
  points = sweep_lib.grid({'config.learning_rate': [1e-3, 3e-3], 'config.model.n_hashes': [1, 2]})
  assert points[1] == {'config.learning_rate': 1e-3, 'config.model.n_hashes': 2}  # last axis fastest
  assert [sweep_lib.run_name(p) for p in points[:2]] == [
      'learning_rate=0.001,n_hashes=1', 'learning_rate=0.001,n_hashes=2']
  # Shortened keys that collide keep their full names; odd characters become '_'.
  assert sweep_lib.run_name({'a.seed': 1, 'b.seed': 2}) == 'a.seed=1,b.seed=2'
  assert sweep_lib.run_name({'model.attention_types': ('lsh', 'full'), 'x': 'a/b c'}) == \
      'attention_types=lsh+full,x=a_b_c'
  assert sweep_lib.point_args({'config.model.attention_types': ('lsh',), 'lengths': '4K'}) == [
      "--config.model.attention_types=('lsh',)", '--lengths=4K']


def test_points_with_the_same_name_are_rejected(tmp_path):
  sweep = sweep_lib.Sweep('dup', ('{python}',), [{'a.x': 1}, {'b.x': 1, 'c.y': 2}, {'x': 1}])
  with pytest.raises(SystemExit, match="points 0 and 2 are both named 'x=1'"):
    sweep_lib.plan(sweep, tmp_path)


def test_workdir_file_names_agree_with_the_package():
  from reformer_jax import checkpointing, tracking  # pylint: disable=import-outside-toplevel
  assert sweep_lib.TRAIN_CONFIG_FILE == checkpointing.CONFIG_FILE
  assert sweep_lib.TRAIN_METRICS_FILE == tracking.METRICS_FILE
  assert sweep_lib.WANDB_RUN_ID_FILE == tracking.RUN_ID_FILE


def test_shipped_sweep_files():
  from configs import chatbot  # pylint: disable=import-outside-toplevel
  timing = sweep_lib.load_sweep('launch/sweeps/attention_timing.py:quick')
  assert [sweep_lib.run_name(p) for p in timing.points[:4]] == [
      'lengths=1K,attention=full', 'lengths=1K,attention=local', 'lengths=1K,attention=lsh,hashes=1',
      'lengths=1K,attention=lsh,hashes=4']
  assert len(sweep_lib.load_sweep('launch/sweeps/attention_timing.py').points) == 7 * (2 + 4)
  training = sweep_lib.load_sweep('launch/sweeps/chatbot_lr_hashes.py')
  assert len(training.points) == 9
  assert len(sweep_lib.load_sweep('launch/sweeps/chatbot_lr_hashes.py:tiny').points) == 4
  config = chatbot.get_config()
  for point in training.points:  # every swept field exists in the config it overrides
    for key, value in point.items():
      *parents, leaf = key.removeprefix('config.').split('.')
      node = config
      for name in parents:
        node = node[name]
      assert type(node[leaf]) is type(value), key
  # The W&B sweep sweeps the same fields and runs the training sweep's command per trial.
  wandb_sweep = yaml.safe_load((REPO / 'launch/sweeps/wandb_chatbot.yaml').read_text())
  assert set(wandb_sweep['parameters']) == set(training.points[0])
  command = wandb_sweep['command']
  assert command[2:6] == ['-m', 'launch.sweep', 'launch/sweeps/chatbot_lr_hashes.py', '--wandb-run']
  assert (REPO / command[4]).is_file() and command[-1] == '${args}'
  with pytest.raises(ValueError, match=':tiny'):
    sweep_lib.load_sweep('launch/sweeps/chatbot_lr_hashes.py:huge')


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, capsys):
  spec = write_sweep(tmp_path / 'fake.py', "[{'n': 1}, {'n': 2}]")
  root = tmp_path / 'root'
  assert sweep_lib.main([str(spec), '--root', str(root), '--dry-run', '--', '--extra=1']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines == [f'run n={i}: cd {REPO} && {PY} {tmp_path}/fake_run.py {root}/n={i} --n={i} '
                   f'--extra=1 >> {root}/n={i}/launch.log 2>&1' for i in (1, 2)]
  assert not root.exists()


# --------------------------------------------------------------------------- sweep: running


def test_resume_skips_finished_runs_and_reruns_the_rest(tmp_path, capsys):
  spec = write_sweep(tmp_path / 'fake.py', "[{'n': 1}, {'n': 2}, {'n': 3}]")
  root = tmp_path / 'root'
  root.mkdir()
  (root / 'FAIL').write_text('n=2')
  assert sweep_lib.main([str(spec), '--root', str(root)]) == 1  # n=2 failed, n=3 still ran
  assert statuses(root) == {'n=1': 'done', 'n=2': 'failed', 'n=3': 'done'}
  assert not (root / 'n=2' / sweep_lib.MARKER).exists()
  out = capsys.readouterr().out
  assert '[2/3] n=2: failed' in out and 'exit code 1' in out and 'ETA' in out

  (root / 'FAIL').unlink()
  assert sweep_lib.main([str(spec), '--root', str(root)]) == 0
  assert [len(calls(root, f'n={i}')) for i in (1, 2, 3)] == [1, 2, 1]  # only n=2 ran again
  assert statuses(root) == {'n=1': 'skipped', 'n=2': 'done', 'n=3': 'skipped'}
  assert 'sweep fake: 3 runs, 2 finished earlier, 1 to run' in capsys.readouterr().out
  assert sweep_lib.main([str(spec), '--root', str(root), '--dry-run']) == 0
  assert all(line.startswith('skip ') for line in capsys.readouterr().out.splitlines())

  # A changed command (here: an argument for every run) makes finished runs run again.
  assert sweep_lib.main([str(spec), '--root', str(root), '--only', 'n=1', '--', '--x=1']) == 0
  assert calls(root, 'n=1')[-1] == '--n=1 --x=1'
  assert statuses(root) == {'n=1': 'done', 'n=2': 'not selected', 'n=3': 'not selected'}
  assert json.loads((root / 'n=1' / sweep_lib.MARKER).read_text())['command'][-1] == '--x=1'


def test_exit_zero_before_num_train_steps_is_not_finished(tmp_path):
  # A trainer stopped by SIGTERM saves a checkpoint and exits 0: its metrics tell.
  spec = write_sweep(tmp_path / 'fake.py', "[{'steps': 5}]")
  root = tmp_path / 'root'
  assert sweep_lib.main([str(spec), '--root', str(root)]) == 1
  assert statuses(root) == {'steps=5': 'incomplete'}
  assert not (root / 'steps=5' / sweep_lib.MARKER).exists()
  assert sweep_lib.training_progress(str(root / 'steps=5')) == (5, 10)
  with open(root / 'steps=5' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 9, "train/lo')  # torn by a kill
  assert sweep_lib.training_progress(str(root / 'steps=5')) == (5, 10)
  spec = write_sweep(tmp_path / 'fake.py', "[{'steps': 10}]")
  assert sweep_lib.main([str(spec), '--root', str(root)]) == 0
  assert statuses(root) == {'steps=10': 'done'}


def test_sigterm_stops_the_running_child_and_the_sweep_resumes(tmp_path):
  script = textwrap.dedent('''
      import pathlib, signal, sys, time
      workdir = pathlib.Path(sys.argv[1]); workdir.mkdir(parents=True, exist_ok=True)
      def on_term(*_):  # like the trainer: save, then exit 0
        (workdir / 'got_sigterm').touch(); sys.exit(0)
      signal.signal(signal.SIGTERM, on_term)
      if sys.argv[2] == '--n=1' and not (workdir / 'started').exists():
        (workdir / 'started').touch(); time.sleep(60)
  ''')
  spec = write_sweep(tmp_path / 'slow.py', "[{'n': 1}, {'n': 2}]", script)
  root = tmp_path / 'root'
  runner = subprocess.Popen([PY, '-m', 'launch.sweep', str(spec), '--root', str(root)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 30
  while not (root / 'n=1' / 'started').exists():
    assert time.monotonic() < deadline and runner.poll() is None, runner.stdout.read()
    time.sleep(0.05)
  runner.send_signal(signal.SIGTERM)
  out = runner.communicate(timeout=30)[0]
  assert runner.returncode == 128 + signal.SIGTERM, out
  assert (root / 'n=1' / 'got_sigterm').exists()  # the child was asked to stop, not killed
  assert 'interrupted by SIGTERM' in out
  assert statuses(root) == {'n=1': 'interrupted', 'n=2': 'pending'}
  assert not (root / 'sweep.pid').exists() and not (root / 'n=1' / sweep_lib.MARKER).exists()
  assert sweep_lib.main([str(spec), '--root', str(root)]) == 0  # resumes: both finish now
  assert statuses(root) == {'n=1': 'done', 'n=2': 'done'}


def test_wandb_run_uses_the_agent_run_id_and_point(tmp_path, monkeypatch, capsys):
  spec = write_sweep(tmp_path / 'fake.py', "[]")
  root = tmp_path / 'root'
  monkeypatch.delenv('WANDB_RUN_ID', raising=False)
  with pytest.raises(SystemExit, match='WANDB_RUN_ID'):
    sweep_lib.main([str(spec), '--wandb-run', '--root', str(root), '--config.learning_rate=0.01'])
  monkeypatch.setenv('WANDB_RUN_ID', 'abc123')
  args = [str(spec), '--wandb-run', '--root', str(root), '--config.learning_rate=0.01',
          '--config.model.n_hashes=2']
  assert sweep_lib.main(args) == 0
  workdir = root / 'learning_rate=0.01,n_hashes=2.abc123'
  assert (workdir / 'wandb_run_id').read_text() == 'abc123'  # tracking.py logs to this run
  assert calls(root, workdir.name) == ['--config.learning_rate=0.01 --config.model.n_hashes=2']
  assert (workdir / sweep_lib.MARKER).exists()
  with pytest.raises(SystemExit):  # outside --wandb-run, unknown flags are errors
    sweep_lib.main([str(spec), '--config.learning_rate=0.01'])
  capsys.readouterr()


def test_tiny_training_grid_runs_and_resumes(tmp_path, tmp_path_factory, monkeypatch, capsys):
  """launch/sweeps/smoke.py (2 seeds of configs/default.py:tiny) through reformer_jax.main."""
  # Only the seed differs, so the second run compiles nothing; the cache is test_train's.
  cache = tmp_path_factory.getbasetemp() / 'jax_compilation_cache'
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(cache))
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  root = tmp_path / 'smoke'
  args = ['launch/sweeps/smoke.py', '--root', str(root), '--',
          '--config.num_train_steps=2', '--config.data.eval_examples=32']
  monkeypatch.chdir(REPO)
  code = sweep_lib.main(args)
  out = capsys.readouterr().out
  assert code == 0, out + '\n'.join((root / n / 'launch.log').read_text()[-3000:]
                                    for n in ('seed=0', 'seed=1') if (root / n).exists())
  rows = {r['name']: r for r in json.loads((root / 'summary.json').read_text())}
  assert set(rows) == {'seed=0', 'seed=1'}
  for name, row in rows.items():
    assert row['status'] == 'done' and row['step'] == 2 and 'eval/loss' in row, row
    assert sweep_lib.training_progress(str(root / name)) == (2, 2)
    assert (root / name / 'checkpoints' / '2').is_dir()
  assert rows['seed=0']['train/loss'] != rows['seed=1']['train/loss']  # the point reached main.py
  assert sweep_lib.main(args) == 0  # everything finished: nothing runs again
  assert 'sweep smoke: 2 runs, 2 finished earlier, 0 to run' in capsys.readouterr().out
  assert (root / 'seed=0' / 'launch.log').read_text().count('launch.sweep run seed=0') == 1


# --------------------------------------------------------------------------- tpu_vm: commands

TPU = ['--name=reformer', '--zone=us-central2-b', '--project=my-proj']
GCLOUD = 'gcloud compute tpus tpu-vm'
WORKER = ('W=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/'
          'v1/instance/attributes/agent-worker-number || hostname)')


def with_dry_run(argv) -> list[str]:
  """`--dry-run` added before any `--` (after it, it would belong to the remote command)."""
  argv = list(argv)
  cut = argv.index('--') if '--' in argv else len(argv)
  return [*argv[:cut], '--dry-run', *argv[cut:]]


def dry_run(*argv: str) -> list[str]:
  out = io.StringIO()
  assert tpu_vm.main(with_dry_run(argv), out=out) == 0
  return out.getvalue().splitlines()


def test_create_and_delete_commands():
  assert dry_run('create', *TPU, '--accelerator-type=v4-8') == [
      f'{GCLOUD} create reformer --zone=us-central2-b --project=my-proj --accelerator-type=v4-8 '
      '--version=tpu-ubuntu2204-base']
  assert dry_run('create', '--name=r', '--zone=us-east5-b', '--accelerator-type=v6e-8', '--spot') == [
      f'{GCLOUD} create r --zone=us-east5-b --accelerator-type=v6e-8 --version=v2-alpha-tpuv6e --spot']
  assert dry_run('create', *TPU, '--accelerator-type=v5litepod-16', '--version=v2-alpha-tpuv5-lite') \
      == [f'{GCLOUD} create reformer --zone=us-central2-b --project=my-proj '
          '--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite']
  assert dry_run('delete', *TPU, '--yes') == [
      f'{GCLOUD} delete reformer --zone=us-central2-b --project=my-proj --quiet']


def test_run_on_all_workers_keeps_a_log_per_worker():
  assert dry_run('run', *TPU, '--log-name=chatbot', '--', 'python3', '-m', 'reformer_jax.main',
                 '--config=configs/chatbot.py', '--workdir=gs://my bucket/chatbot') == [
      f"{GCLOUD} ssh reformer --zone=us-central2-b --project=my-proj --worker=all "
      f"'--command=set -o pipefail; . reformer_venv/bin/activate && cd reformer_jax && {WORKER} && "
      "mkdir -p workdir/logs/chatbot && "
      "(python3 -m reformer_jax.main --config=configs/chatbot.py '\"'\"'--workdir=gs://my bucket/"
      "chatbot'\"'\"') 2>&1 | tee -a workdir/logs/chatbot/worker-$W.log'"]
  (line,) = dry_run('run', *TPU, '--worker=0', '--log-name=a', '--detach', '--env', 'A=1 2', '--',
                    'echo x && echo y')
  assert line.startswith(f"{GCLOUD} ssh reformer --zone=us-central2-b --project=my-proj "
                         "--worker=0 '--command=. reformer_venv/bin/activate && export "
                         "A='\"'\"'1 2'\"'\"' && cd reformer_jax && ")
  assert ('{ nohup bash -c '"'\"'\"'set -o pipefail; echo x && echo y'\"'\"' >> "
          'workdir/logs/a/worker-$W.log 2>&1 < /dev/null & }') in line


def test_setup_sweep_and_fetch_commands():
  assert dry_run('setup', *TPU, '--source=git', '--repo=https://github.com/me/reformer_jax.git') == [
      f"{GCLOUD} ssh reformer --zone=us-central2-b --project=my-proj --worker=all '--command={{ [ -x "
      "reformer_venv/bin/python ] || { python3 -m pip install --user --quiet uv && python3 -m uv "
      "venv --seed --python 3.11 reformer_venv; }; } && . reformer_venv/bin/activate && { if "
      "[ -d reformer_jax/.git ]; then git -C reformer_jax pull --ff-only; else git clone "
      "https://github.com/me/reformer_jax.git reformer_jax; fi; } && cd reformer_jax && python3 -m "
      "pip install -e . '\"'\"'jax[tpu]>=0.10.2,<0.11'\"'\"''"]
  archive = REPO / 'workdir' / 'launch' / 'reformer_jax-setup.tar.gz'
  pack, scp, ssh = dry_run('setup', *TPU)
  assert pack.startswith(f'# pack reformer_jax/ <- {REPO} into {archive}')
  assert scp == (f'{GCLOUD} scp {archive} reformer:reformer_jax-setup.tar.gz --zone=us-central2-b '
                 '--project=my-proj --worker=all')
  assert ssh.startswith(f"{GCLOUD} ssh reformer --zone=us-central2-b --project=my-proj --worker=all "
                        "'--command=tar -xzf reformer_jax-setup.tar.gz -C . && rm "
                        "reformer_jax-setup.tar.gz && { [ -x reformer_venv/bin/python ] || ")
  assert ssh.endswith("cd reformer_jax && python3 -m pip install -e . "
                      "'\"'\"'jax[tpu]>=0.10.2,<0.11'\"'\"''")
  assert dry_run('sweep', *TPU, '--detach', 'launch/sweeps/attention_timing.py')[0].endswith(
      "mkdir -p workdir/logs/sweep-attention_timing && { nohup bash -c '\"'\"'set -o pipefail; "
      "python3 -m launch.sweep launch/sweeps/attention_timing.py'\"'\"' >> "
      "workdir/logs/sweep-attention_timing/worker-$W.log 2>&1 < /dev/null & } && echo \"started on "
      "$(hostname) (worker $W): pid $!, log $PWD/workdir/logs/sweep-attention_timing/worker-$W.log\"'")
  assert dry_run('fetch', *TPU, '--to=results/tpu') == [
      'mkdir -p results/tpu',
      f'{GCLOUD} scp reformer:reformer_jax/workdir results/tpu --zone=us-central2-b '
      '--project=my-proj --worker=0 --recurse']
  assert dry_run('fetch', *TPU, '--to=gs://b/reformer', 'workdir/sweeps', 'workdir/logs') == [
      f"{GCLOUD} ssh reformer --zone=us-central2-b --project=my-proj --worker=0 '--command=. "
      "reformer_venv/bin/activate && cd reformer_jax && gcloud storage rsync --recursive "
      "workdir/sweeps gs://b/reformer/sweeps && gcloud storage rsync --recursive workdir/logs "
      "gs://b/reformer/logs'"]


def test_fetch_copies_bucket_workdirs_from_here():
  # A run trained with --workdir=gs://... is on the bucket, not on the VM: gcloud copies it here.
  assert dry_run('fetch', *TPU, '--to=results', 'gs://b/reformer/chatbot', 'workdir/logs') == [
      'mkdir -p results',
      'gcloud storage rsync --recursive gs://b/reformer/chatbot results/chatbot',
      f'{GCLOUD} scp reformer:reformer_jax/workdir/logs results --zone=us-central2-b '
      '--project=my-proj --worker=0 --recurse']
  assert dry_run('fetch', '--host=local', '--to=gs://c/copy', 'gs://b/run/') == [
      'gcloud storage rsync --recursive gs://b/run/ gs://c/copy/run']


def test_gpu_host_commands_go_through_ssh():
  assert dry_run('run', '--host=me@gpu', '--venv=reformer_venv', '--log-name=t', '--',
                 'nvidia-smi') == [
      "ssh me@gpu 'set -o pipefail; . reformer_venv/bin/activate && cd reformer_jax && "
      "W=$(hostname) && mkdir -p workdir/logs/t && (nvidia-smi) 2>&1 | tee -a workdir/logs/t/$W.log'"]
  assert dry_run('sweep', '--host=me@gpu', '--venv=', 'launch/sweeps/attention_timing.py', '--',
                 '--heads=8') == [
      "ssh me@gpu 'set -o pipefail; cd reformer_jax && W=$(hostname) && mkdir -p "
      "workdir/logs/sweep-attention_timing && (python3 -m launch.sweep "
      "launch/sweeps/attention_timing.py -- --heads=8) 2>&1 | tee -a "
      "workdir/logs/sweep-attention_timing/$W.log'"]
  setup = dry_run('setup', '--host=me@gpu', '--venv=v')
  assert setup[1] == 'scp ' + str(REPO / 'workdir/launch/reformer_jax-setup.tar.gz') + \
      ' me@gpu:reformer_jax-setup.tar.gz'
  assert setup[2].endswith("{ [ -x v/bin/python ] || { python3 -m venv v; }; } && "
                           ". v/bin/activate && cd reformer_jax && python3 -m pip install -e . "
                           "'\"'\"'jax[cuda12]>=0.10.2,<0.11'\"'\"''")
  assert dry_run('fetch', '--host=me@gpu', '--to=out') == [
      'mkdir -p out', 'scp -r me@gpu:reformer_jax/workdir out']


def test_bad_target_arguments_are_errors(capsys):
  for argv in (['run', '--', 'ls'], ['run', '--host=h', '--name=n', '--', 'ls'],
               ['create', '--host=h'], ['run', *TPU], ['sweep', *TPU, 'no/such/sweep.py']):
    with pytest.raises(SystemExit):
      tpu_vm.main(with_dry_run(argv))
  capsys.readouterr()


def test_local_run_logs_and_exit_code(tmp_path, monkeypatch):
  # The script `run` builds, executed for real on this machine (--host=local, bash).
  monkeypatch.setattr(tpu_vm, 'LOGS_DIR', str(tmp_path / 'logs'))
  assert tpu_vm.main(['run', '--host=local', '--log-name=t', '--', 'echo hello; exit 3']) == 3
  log = tmp_path / 'logs' / 't' / f'{socket.gethostname()}.log'
  assert log.read_text() == 'hello\n'
  assert tpu_vm.main(['run', '--host=local', '--log-name=t', '--detach', '--',
                      f'{PY} -c "print(42)"']) == 0
  deadline = time.monotonic() + 20
  while '42' not in log.read_text():
    assert time.monotonic() < deadline
    time.sleep(0.05)


def test_setup_archive_holds_the_working_tree_only(tmp_path):
  data = tmp_path / 'data'
  (data / 'sgd').mkdir(parents=True)
  (data / 'sgd' / 'x.json').write_text('{}')
  step = tpu_vm.Step(pack=((REPO, 'reformer_jax'), (data, 'shared/data')),
                     archive=tmp_path / 'a.tar.gz')
  tpu_vm.pack_archive(step)
  names = set(tarfile.open(step.archive).getnames())
  assert {'reformer_jax/launch/sweep.py', 'reformer_jax/pyproject.toml',
          'shared/data/sgd/x.json'} <= names
  assert not any(n.startswith(('reformer_jax/.git/', 'reformer_jax/workdir/')) or '__pycache__' in n
                 for n in names)


# --------------------------------------------------------------------------- multi-host (slow)


@pytest.mark.slow
def test_two_processes_on_localhost_train_and_resume(tmp_path):
  """`reformer_jax.main --distributed` as 2 CPU processes: one mesh over both, metrics written by
  process 0 only, an Orbax multi-process checkpoint, and a resume from it.

  `jax.distributed.initialize()` (no arguments, as main.py calls it) finds the process count and
  ids only in a known cluster environment; this test poses as an Open MPI launch on localhost.
  """
  workdir = tmp_path / 'run'
  port = 20000 + os.getpid() % 20000

  def launch(steps):
    procs = []
    for rank in (0, 1):
      env = dict(os.environ, OMPI_MCA_orte_hnp_uri='4096.0;tcp://127.0.0.1:1',
                 OMPI_COMM_WORLD_SIZE='2', OMPI_COMM_WORLD_RANK=str(rank),
                 OMPI_COMM_WORLD_LOCAL_RANK=str(rank), JAX_COORDINATOR_PORT=str(port),
                 JAX_PLATFORMS='cpu')
      procs.append(subprocess.Popen(
          [PY, '-m', 'reformer_jax.main', '--distributed', '--config=configs/default.py:tiny',
           f'--workdir={workdir}', f'--config.num_train_steps={steps}',
           '--config.checkpoint_every_steps=2', '--config.wandb.mode=disabled',
           '--config.data.eval_examples=32'], cwd=REPO, env=env, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], '\n'.join(o[-3000:] for o in outs)
    return outs

  outs = launch(2)
  assert 'process 1 of 2' in outs[1] and 'Devices: 2 (cpu), processes: 2' in outs[0]
  assert {p.name for p in (workdir / 'checkpoints' / '2' / 'state').glob('ocdbt.process_*')} == {
      'ocdbt.process_0', 'ocdbt.process_1'}
  outs = launch(4)
  assert 'Resumed from checkpoint step 2' in outs[0] and 'Resumed from checkpoint step 2' in outs[1]
  steps = [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert steps.count(4) == 2  # train and eval records, once each: only process 0 writes
