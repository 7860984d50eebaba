"""Runs a sweep's grid one run after another on this machine, each in its own workdir; resumable.

    python -m launch.sweep launch/sweeps/chatbot_lr_hashes.py             # run, or resume, the grid
    python -m launch.sweep launch/sweeps/attention_timing.py:quick --dry-run   # print, run nothing
    python -m launch.sweep launch/sweeps/smoke.py --root /tmp/smoke -- --config.num_train_steps=5

A sweep file is Python, like the configs: `get_sweep(arg)` returns a `Sweep`, whose `command`
is one argv (`{python}` is this interpreter, `{workdir}` the run's workdir) and whose `points`
each add `--key=value` arguments to it (`grid(...)` builds them as a product). Arguments after
`--` are appended to every run. Children run from the repository root.

Layout of a sweep root (default `workdir/sweeps/<sweep name>` in the repository):

    <root>/<run>/                 one folder per point, named from it: `learning_rate=0.001,n_hashes=2`
    <root>/<run>/launch.log       the run's stdout and stderr, every attempt appended
    <root>/<run>/launch_done.json written after the run exited 0 (and, for `reformer_jax.main`,
                                  after its metrics.jsonl reached num_train_steps): skip marker
    <root>/summary.json           status, time and headline numbers of every run
    <root>/sweep.pid              the runner's pid while it runs (`kill -TERM $(cat ...)` stops it)

The run's workdir is `<root>/<run>` too, unless `--workdirs` puts workdirs elsewhere (say
`gs://bucket/sweep`, for `reformer_jax.main` runs, which write there through `etils.epath`);
logs and markers stay under `--root`. The runner reads a bucket workdir's config.json and
metrics.jsonl through epath as well (gcsfs and Google credentials: see the README).

Resuming: rerunning the same command skips every run with a marker whose recorded command is
the one the sweep gives now; every other run starts again in its workdir, where
`reformer_jax.main` resumes from its newest checkpoint. A run counts as finished only when it
exited 0 and, if it is a training run (its workdir has `config.json`), its metrics reached
`num_train_steps`: a trainer stopped by SIGTERM saves a checkpoint and exits 0 too.

Stopping: Ctrl-C or SIGTERM to the runner sends SIGTERM to the running child (the trainer saves
a checkpoint), waits for it (`--grace-s`), writes the summary and exits 128 + signal.

W&B agents: `--wandb-run` runs the one point that a `wandb agent` passes as `--key=value`
arguments (see `launch/sweeps/wandb_chatbot.yaml`), in `<root>/<point>.<run id>`, and tells the
trainer to log to the agent's run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import importlib.util
import itertools
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from launch import REPO_ROOT

MARKER = 'launch_done.json'
LOG = 'launch.log'
SUMMARY = 'summary.json'
PID_FILE = 'sweep.pid'
# What `reformer_jax` keeps in a workdir (`checkpointing.CONFIG_FILE`, `tracking.METRICS_FILE`,
# `tracking.RUN_ID_FILE`); named here so the runner does not import JAX. tests/test_launch.py
# checks that they still agree with the package.
TRAIN_CONFIG_FILE = 'config.json'
TRAIN_METRICS_FILE = 'metrics.jsonl'
WANDB_RUN_ID_FILE = 'wandb_run_id'


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A named grid of runs of one command."""
  name: str                                  # names the default root, workdir/sweeps/<name>
  command: Sequence[str]                     # argv; '{python}' and '{workdir}' are filled in
  points: Sequence[Mapping[str, Any]]        # one run per point; each item adds '--key=value'
  # The headline numbers of a finished run, from its workdir (default: training metrics), given
  # as a pathlib.Path, or an etils.epath.Path (the same methods) for a bucket workdir.
  summarize: Callable[[Any], Mapping[str, Any]] | None = None


def grid(axes: Mapping[str, Iterable[Any]]) -> list[dict[str, Any]]:
  """Every combination of the axes' values, the first axis varying slowest."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def load_sweep(spec: str) -> Sweep:
  """`path/to/sweep.py[:arg]` -> the file's `get_sweep(arg)` (arg '' when absent); a relative
  path is tried from the working directory, then from the repository root."""
  path, _, arg = spec.partition(':')
  file = pathlib.Path(path)
  if not file.is_file() and not file.is_absolute():
    file = REPO_ROOT / path  # launch/sweeps/... from anywhere
  if not file.is_file():
    raise SystemExit(f'sweep file {path} not found (give a path such as '
                     f'launch/sweeps/attention_timing.py[:quick])')
  module_spec = importlib.util.spec_from_file_location(f'_sweep_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise SystemExit(f'{path} defines no get_sweep(arg) returning a launch.sweep.Sweep')
  return module.get_sweep(arg)


# --------------------------------------------------------------------------- planning


def format_value(value: Any) -> str:
  """A point value as a command-line string: tuples and lists in Python syntax, else str()."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def run_name(point: Mapping[str, Any]) -> str:
  """`{'config.learning_rate': 0.001, 'config.model.n_hashes': 2}` -> 'learning_rate=0.001,n_hashes=2'.

  Keys are shortened to their last dotted part unless two would collide; tuple values are joined
  with `+`; characters other than letters, digits and `._=,+-` become `_`.
  """
  shorts = [key.lstrip('-').rsplit('.', 1)[-1] for key in point]
  if len(set(shorts)) < len(shorts):
    shorts = [key.lstrip('-') for key in point]
  text = ','.join(f'{k}={"+".join(map(str, v)) if isinstance(v, (tuple, list)) else v}'
                 for k, v in zip(shorts, point.values()))
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', text) or 'default'


def point_args(point: Mapping[str, Any]) -> list[str]:
  return [f'{key if key.startswith("-") else "--" + key}={format_value(value)}'
          for key, value in point.items()]


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of a sweep, planned."""
  index: int
  name: str
  point: Mapping[str, Any]
  template: tuple[str, ...]  # the command before '{python}'/'{workdir}' are filled in
  dir: pathlib.Path          # log and marker (and the workdir unless --workdirs)
  workdir: str

  @property
  def argv(self) -> list[str]:
    return [a.replace('{python}', sys.executable).replace('{workdir}', self.workdir)
            for a in self.template]

  @property
  def log(self) -> pathlib.Path:
    return self.dir / LOG

  @property
  def marker(self) -> pathlib.Path:
    return self.dir / MARKER


def plan(sweep: Sweep, root: pathlib.Path, *, workdirs: str | None = None,
         extra_args: Sequence[str] = (), names: Sequence[str] | None = None) -> list[Run]:
  """The sweep's runs, in order; `names` (from the points by default) must be unique."""
  names = list(names) if names is not None else [run_name(p) for p in sweep.points]
  seen: dict[str, int] = {}
  for i, name in enumerate(names):
    if name in seen:
      raise SystemExit(f'sweep {sweep.name}: points {seen[name]} and {i} are both named {name!r} '
                       f'({dict(sweep.points[seen[name]])} and {dict(sweep.points[i])}); make the '
                       f'points differ in their values')
    seen[name] = i
  runs = []
  for i, (name, point) in enumerate(zip(names, sweep.points)):
    workdir = f'{workdirs.rstrip("/")}/{name}' if workdirs else str(root / name)
    template = (*sweep.command, *point_args(point), *extra_args)
    runs.append(Run(i, name, dict(point), template, root / name, workdir))
  return runs


# --------------------------------------------------------------------------- state of a run


def read_marker(run: Run) -> dict[str, Any] | None:
  try:
    return json.loads(run.marker.read_text())
  except FileNotFoundError:
    return None


def is_finished(run: Run) -> bool:
  """A marker exists and records the command the sweep gives for this run now."""
  marker = read_marker(run)
  return marker is not None and marker.get('command') == list(run.template)


def workdir_path(workdir: str):
  """A run's workdir as a path: `pathlib.Path`, or `etils.epath.Path` for a bucket URL (epath
  is imported only then; it imports no JAX)."""
  if '://' not in workdir:
    return pathlib.Path(workdir)
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(workdir)


def training_progress(workdir: str) -> tuple[int, int] | None:
  """(last logged step, num_train_steps) of a `reformer_jax.main` run; None when `workdir` is
  not a training workdir (no `config.json`) or, for a bucket, cannot be read (reported)."""
  path = workdir_path(workdir)
  try:
    return _training_progress(path)
  except Exception as e:  # pylint: disable=broad-except  # gcsfs/credential errors vary
    if '://' not in workdir:
      raise
    print(f'launch.sweep: cannot read {workdir} ({type(e).__name__}: {e}); its progress is '
          f'not checked', file=sys.stderr)
    return None


def _training_progress(path) -> tuple[int, int] | None:
  if not (path / TRAIN_CONFIG_FILE).is_file():
    return None
  total = json.loads((path / TRAIN_CONFIG_FILE).read_text()).get('num_train_steps')
  if total is None:
    return None
  return max([-1] + [r['step'] for r in _records(path / TRAIN_METRICS_FILE)]), total


def training_summary(workdir) -> dict[str, Any]:
  """The last logged value of `step` and every loss and accuracy in `metrics.jsonl`."""
  out: dict[str, Any] = {}
  for record in _records(workdir / TRAIN_METRICS_FILE):
    out.update({k: v for k, v in record.items()
                if k == 'step' or k.endswith(('/loss', '/accuracy'))})
  return out


def _records(path) -> list[dict[str, Any]]:
  """The JSON lines of `path` ([] if missing); a torn last line (a killed writer) is left out."""
  if not path.is_file():
    return []
  lines = [line for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
  records = [json.loads(line) for line in lines[:-1]]
  try:
    records += [json.loads(line) for line in lines[-1:]]
  except json.JSONDecodeError:
    pass  # written only in part when its process was killed
  return records


# --------------------------------------------------------------------------- running


class Interrupted(Exception):
  """The runner got SIGINT or SIGTERM."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _raise_interrupted(signum, frame):
  del frame
  raise Interrupted(signum)


@dataclasses.dataclass
class Outcome:
  status: str  # done | skipped (finished earlier) | failed | incomplete | interrupted | pending
               # (not reached) | not selected (--only)
  seconds: float | None = None
  returncode: int | None = None
  note: str = ''


def execute(run: Run, *, stream: bool = False, grace_s: float = 300.0) -> Outcome:
  """Runs `run` to the end, its output appended to `run.log`; writes the marker on success.

  Raises `Interrupted` (after stopping the child with SIGTERM, then SIGKILL after `grace_s`)
  when the runner is interrupted.
  """
  run.dir.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  start = time.monotonic()
  with open(run.log, 'a', encoding='utf-8') as log:
    log.write(f'\n=== {_now()} launch.sweep run {run.name}\n=== {shlex.join(run.argv)}\n')
    log.flush()
    # A session of its own: a Ctrl-C in the terminal reaches only the runner, which then sends
    # the child SIGTERM (the trainer's preemption path: save a checkpoint, exit).
    proc = subprocess.Popen(run.argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors='replace',
                            start_new_session=True)
    try:
      _copy_lines(proc, log, stream)
      returncode = proc.wait()
    except (Interrupted, KeyboardInterrupt) as e:
      signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
      log.write(f'=== {_now()} interrupted ({signal.Signals(signum).name}): sending SIGTERM\n')
      _stop(proc, log, stream, grace_s)
      log.write(f'=== exit code {proc.returncode}\n')
      raise Interrupted(signum) from None
    seconds = time.monotonic() - start
    log.write(f'=== {_now()} exit code {returncode} after {_duration(seconds)}\n')
  if returncode != 0:
    return Outcome('failed', seconds, returncode, f'exit code {returncode}; see {run.log}')
  progress = training_progress(run.workdir)
  if progress is not None and progress[0] < progress[1]:
    return Outcome('incomplete', seconds, returncode,
                   f'exited 0 at step {progress[0]} of {progress[1]} (stopped by SIGTERM?)')
  tmp = run.marker.with_suffix('.tmp')
  tmp.write_text(json.dumps({'command': list(run.template), 'point': run.point,
                             'workdir': run.workdir, 'seconds': seconds,
                             'finished': _now()}, indent=2, default=str))
  os.replace(tmp, run.marker)
  return Outcome('done', seconds, returncode)


def _copy_lines(proc: subprocess.Popen, log, stream: bool) -> None:
  for line in proc.stdout:
    log.write(line)
    if stream:
      sys.stdout.write(line)
  log.flush()


def _stop(proc: subprocess.Popen, log, stream: bool, grace_s: float) -> None:
  """SIGTERM to the child's process group, SIGKILL after `grace_s`; its output still logged."""
  def kill(sig):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      pass
  kill(signal.SIGTERM)
  timer = threading.Timer(grace_s, kill, (signal.SIGKILL,))
  timer.start()
  try:
    _copy_lines(proc, log, stream)
    proc.wait()
  except (Interrupted, KeyboardInterrupt):  # asked twice: stop now
    kill(signal.SIGKILL)
    proc.wait()
  finally:
    timer.cancel()


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec='seconds')


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return '-'
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return f'{h}h{rest // 60:02d}m{rest % 60:02d}s' if h else f'{rest // 60}m{rest % 60:02d}s'


class _PidFile:
  """`<root>/sweep.pid` while the runner runs; refuses a second runner on the same root."""

  def __init__(self, root: pathlib.Path):
    self.path = root / PID_FILE

  def __enter__(self):
    if self.path.is_file():
      pid = int(self.path.read_text().strip() or 0)
      if pid and pid != os.getpid() and _alive(pid):
        raise SystemExit(f'another launch.sweep (pid {pid}) is running in {self.path.parent}; '
                         f'stop it first (kill -TERM {pid}) or use another --root')
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(str(os.getpid()))
    return self

  def __exit__(self, *exc):
    self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def run_sweep(sweep: Sweep, runs: Sequence[Run], root: pathlib.Path, *, stream: bool = False,
              grace_s: float = 300.0, only: Iterable[str] | None = None,
              out=None) -> dict[str, Outcome]:
  """Runs every unfinished run (of those named in `only`, if given) in order; prints progress
  with an ETA, and a summary of all runs at the end.

  Returns the outcome of every run (by name). Raises `Interrupted` after writing the summary.
  """
  out = out or sys.stdout
  def say(text):
    print(text, file=out, flush=True)

  total = len(runs)
  only = None if only is None else set(only)
  outcomes = {r.name: Outcome('skipped', (read_marker(r) or {}).get('seconds')) if is_finished(r)
              else Outcome('pending' if only is None or r.name in only else 'not selected')
              for r in runs}
  todo = [r for r in runs if outcomes[r.name].status == 'pending']
  finished = sum(o.status == 'skipped' for o in outcomes.values())
  say(f'sweep {sweep.name}: {total} runs, {finished} finished earlier, {len(todo)} to run; '
      f'root {root}')
  times: list[float] = []
  try:
    with _PidFile(root):
      for k, run in enumerate(todo):
        eta = (f'ETA {_duration(sum(times) / len(times) * (len(todo) - k))}' if times
               else 'ETA after the first run')
        say(f'[{run.index + 1}/{total}] {run.name}: starting ({k} of {len(todo)} run so far, '
            f'{eta}); log {run.log}')
        outcome = execute(run, stream=stream, grace_s=grace_s)
        outcomes[run.name] = outcome
        times.append(outcome.seconds)
        say(f'[{run.index + 1}/{total}] {run.name}: {outcome.status} in '
            f'{_duration(outcome.seconds)}' + (f': {outcome.note}' if outcome.note else ''))
        if outcome.status == 'failed':
          say(_tail(run.log))
  except Interrupted as e:
    current = next((r for r in todo if outcomes[r.name].status == 'pending'), None)
    if current is not None:
      outcomes[current.name] = Outcome('interrupted', note=f'{e}; rerun the sweep to resume')
    say(f'interrupted by {e}: rerun the same command to resume')
    write_summary(sweep, runs, outcomes, root, out)
    raise
  write_summary(sweep, runs, outcomes, root, out)
  return outcomes


def _tail(path: pathlib.Path, lines: int = 15) -> str:
  text = path.read_text(errors='replace').splitlines()[-lines:]
  return '\n'.join(f'    | {line}' for line in text)


def write_summary(sweep: Sweep, runs: Sequence[Run], outcomes: Mapping[str, Outcome],
                  root: pathlib.Path, out=None) -> list[dict[str, Any]]:
  """Writes `<root>/summary.json` and prints a table: status, time and headline numbers."""
  out = out or sys.stdout
  summarize = sweep.summarize or training_summary
  rows = []
  for run in runs:
    outcome = outcomes[run.name]
    numbers: Mapping[str, Any] = {}
    if outcome.status in ('done', 'skipped', 'incomplete'):
      try:
        numbers = summarize(workdir_path(run.workdir))
      except (OSError, ValueError, KeyError, ImportError) as e:
        numbers = {'summary_error': f'{type(e).__name__}: {e}'}
    rows.append({'name': run.name, 'status': outcome.status, 'seconds': outcome.seconds,
                 'note': outcome.note, 'point': run.point, 'workdir': run.workdir, **numbers})
  root.mkdir(parents=True, exist_ok=True)
  (root / SUMMARY).write_text(json.dumps(rows, indent=2, default=str))
  _print_table(sweep, rows, out)
  return rows


def _print_table(sweep: Sweep, rows: list[dict[str, Any]], out) -> None:
  from rich.console import Console  # pylint: disable=import-outside-toplevel
  from rich.table import Table  # pylint: disable=import-outside-toplevel

  fixed = ('name', 'status', 'seconds', 'note', 'point', 'workdir')
  numbers = sorted({k for row in rows for k in row if k not in fixed})
  table = Table(title=f'sweep {sweep.name}')
  for column in ('run', 'status', 'time', *numbers):
    table.add_column(column)
  for row in rows:
    table.add_row(row['name'], row['status'], _duration(row['seconds']),
                  *(_cell(row.get(k)) for k in numbers))
  Console(file=out, width=max(120, 24 * (3 + len(numbers)))).print(table)
  counts = {s: sum(r['status'] == s for r in rows) for s in dict.fromkeys(r['status'] for r in rows)}
  print(', '.join(f'{n} {s}' for s, n in counts.items()), file=out, flush=True)


def _cell(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


# --------------------------------------------------------------------------- W&B agents


def wandb_run(sweep: Sweep, root: pathlib.Path, agent_args: Sequence[str], *,
              workdirs: str | None = None, extra_args: Sequence[str] = (),
              dry_run: bool = False, out=None) -> int:
  """Runs the one point a `wandb agent` passes (`--key=value` arguments) in its own workdir.

  The workdir is `<root>/<point>.<run id>`; `<workdir>/wandb_run_id` is set to the agent's run
  id before the trainer starts, so that `reformer_jax.tracking` logs to the agent's run (it
  reuses the id kept there). Returns the run's exit code.
  """
  out = out or sys.stdout
  run_id = os.environ.get('WANDB_RUN_ID')
  if not run_id:
    raise SystemExit('--wandb-run needs $WANDB_RUN_ID: start it with `wandb agent`, which sets it '
                     '(see launch/sweeps/wandb_chatbot.yaml)')
  point = {}
  for arg in agent_args:
    key, eq, value = arg.partition('=')
    if not key.startswith('--') or not eq:
      raise SystemExit(f'--wandb-run takes --key=value arguments from the agent, got {arg!r}')
    point[key[2:]] = value
  one = dataclasses.replace(sweep, points=[point])
  (run,) = plan(one, root, workdirs=workdirs, extra_args=extra_args,
                names=[f'{run_name(point)}.{run_id}'])
  if dry_run:
    print(_describe(run, 'run'), file=out)
    return 0
  workdir = workdir_path(run.workdir)
  if '://' not in run.workdir:  # a bucket has no folders to make
    workdir.mkdir(parents=True, exist_ok=True)
  (workdir / WANDB_RUN_ID_FILE).write_text(run_id)
  if is_finished(run):
    print(f'{run.name}: finished earlier', file=out)
    return 0
  print(f'{run.name}: starting; log {run.log}', file=out, flush=True)
  outcome = execute(run, stream=True)
  print(f'{run.name}: {outcome.status} in {_duration(outcome.seconds)} {outcome.note}', file=out)
  return 0 if outcome.status == 'done' else (outcome.returncode or 1)


# --------------------------------------------------------------------------- command line


def _describe(run: Run, action: str) -> str:
  return f'{action} {run.name}: cd {shlex.quote(str(REPO_ROOT))} && {shlex.join(run.argv)}' \
         f' >> {shlex.quote(str(run.log))} 2>&1'


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
  """(flags, arguments after `--`, unknown `--key=value` arguments for --wandb-run)."""
  if '--' in argv:
    cut = list(argv).index('--')
    argv, extra = list(argv[:cut]), list(argv[cut + 1:])
  else:
    argv, extra = list(argv), []
  p = argparse.ArgumentParser(prog='python -m launch.sweep', description=__doc__.split('\n\n')[0],
                              epilog='Arguments after -- are appended to every run.')
  p.add_argument('sweep', help='sweep file and optional argument: launch/sweeps/<name>.py[:arg]')
  p.add_argument('--root', type=pathlib.Path, default=None,
                 help='folder of the runs\' logs, markers and (by default) workdirs; default '
                      'workdir/sweeps/<sweep name> in the repository')
  p.add_argument('--workdirs', default=None,
                 help='parent of the run workdirs when not --root (e.g. gs://bucket/sweep)')
  p.add_argument('--dry-run', action='store_true',
                 help='print what would run or be skipped, and the exact commands; run nothing')
  p.add_argument('--only', nargs='+', default=None, metavar='GLOB',
                 help='run only the runs whose names match one of these globs')
  p.add_argument('--stream', action='store_true', help='also copy the runs\' output here')
  p.add_argument('--grace-s', type=float, default=300.0,
                 help='on interruption, seconds the running child gets after SIGTERM')
  p.add_argument('--wandb-run', action='store_true',
                 help='run the single point a `wandb agent` passes as --key=value arguments')
  args, unknown = p.parse_known_args(argv)
  if unknown and not args.wandb_run:
    p.error(f'unrecognized arguments: {" ".join(unknown)} (arguments for the runs go after --)')
  return args, extra, unknown


def main(argv: Sequence[str] | None = None, out=None) -> int:
  out = out or sys.stdout
  args, extra, agent_args = parse_args(sys.argv[1:] if argv is None else argv)
  sweep = load_sweep(args.sweep)
  root = (args.root or REPO_ROOT / 'workdir' / 'sweeps' / sweep.name).absolute()
  if args.wandb_run:
    return wandb_run(sweep, root, agent_args, workdirs=args.workdirs, extra_args=extra,
                     dry_run=args.dry_run, out=out)
  runs = plan(sweep, root, workdirs=args.workdirs, extra_args=extra)
  selected = runs
  if args.only:
    selected = [r for r in runs if any(fnmatch.fnmatchcase(r.name, g) for g in args.only)]
    if not selected:
      raise SystemExit(f'--only {" ".join(args.only)} matches no run of sweep {sweep.name}')
  if args.dry_run:
    for run in selected:
      print(_describe(run, 'skip' if is_finished(run) else 'run'), file=out)
    return 0
  previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    outcomes = run_sweep(sweep, runs, root, stream=args.stream, grace_s=args.grace_s,
                         only=[r.name for r in selected] if args.only else None, out=out)
  except Interrupted as e:
    return 128 + e.signum
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return 0 if all(o.status in ('done', 'skipped', 'not selected') for o in outcomes.values()) else 1


if __name__ == '__main__':
  # Run as `launch.sweep`, not `__main__`, so that sweep files importing `launch.sweep` share
  # these classes.
  from launch import sweep as _sweep  # pylint: disable=import-self
  sys.exit(_sweep.main())
