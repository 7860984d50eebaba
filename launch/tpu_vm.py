"""Cloud TPU VMs and GPU hosts: create, set up, run commands and sweeps, fetch results, delete.

    python -m launch.tpu_vm create --name=reformer --zone=us-central2-b --project=my-project \\
        --accelerator-type=v4-8                  # runtime version picked from the type, or --version
    python -m launch.tpu_vm setup --name=reformer --zone=us-central2-b --data=../shared/data
    python -m launch.tpu_vm run --name=reformer --zone=us-central2-b -- python3 -m reformer_jax.main \\
        --config=configs/chatbot.py --workdir=workdir/chatbot
    python -m launch.tpu_vm sweep --name=reformer --zone=us-central2-b --detach \\
        launch/sweeps/attention_timing.py
    python -m launch.tpu_vm fetch --name=reformer --zone=us-central2-b --to=results/tpu
    python -m launch.tpu_vm delete --name=reformer --zone=us-central2-b

A GPU machine takes the same `setup`, `run`, `sweep` and `fetch` with `--host=user@machine` (over
ssh) or `--host=local` (this machine) in place of `--name`/`--zone`/`--project`.

Every subcommand takes `--dry-run`: it prints the exact commands (`gcloud compute tpus tpu-vm ...`,
`ssh`, `scp`), one per line, and runs nothing. The remote side:

    ~/reformer_jax/                 the repository (`--remote-dir`), installed with `pip install -e .`
    ~/shared/data/                  the datasets, when `setup --data` copied them (the repo's default)
    ~/reformer_jax/workdir/logs/<log name>/worker-<N>.log    each worker's output of `run`/`sweep`
    ~/reformer_jax/workdir/sweeps/<sweep name>/              `launch.sweep` roots (logs, workdirs)

`run` and `sweep` start every command in `~/reformer_jax` (with `--venv` activated and `--env`
exported) on every worker (`--worker=all`, the default); each worker appends its output to its own
log, named by its worker number from the TPU metadata server. `--detach` starts the command with
`nohup` and returns at once; a preempted or disconnected ssh then does not stop the job. A
command given as one argument after `--` is shell code (`-- 'cd x && y'`); several arguments are
quoted one by one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence

from launch import REPO_ROOT

GCLOUD_TPU = ('gcloud', 'compute', 'tpus', 'tpu-vm')
# Where `agent-worker-number` lives on a TPU VM (JAX's own cluster detection reads it too).
WORKER_NUMBER = ('$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/'
                 'computeMetadata/v1/instance/attributes/agent-worker-number || hostname)')
# TPU software versions for JAX, by accelerator generation (`--accelerator-type` prefix).
RUNTIME_VERSIONS = {'v2': 'tpu-ubuntu2204-base', 'v3': 'tpu-ubuntu2204-base',
                    'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
                    'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
LOGS_DIR = 'workdir/logs'
DEFAULT_VENV = 'reformer_venv'
# The Python a TPU VM's venv gets (jax 0.10 needs >= 3.11; the TPU Ubuntu 22.04 images have 3.10).
TPU_PYTHON = '3.11'
SETUP_ARCHIVE = 'reformer_jax-setup.tar.gz'


def jax_requirement(extra: str) -> str:
  """`jax[<extra>]` in the version range pyproject.toml gives jax: 'jax[tpu]>=0.10.2,<0.11'."""
  text = (REPO_ROOT / 'pyproject.toml').read_text()
  match = re.search(r'"jax\s*([<>=!~][^"]*)"', text)
  if match is None:
    raise SystemExit('pyproject.toml has no "jax<version range>" dependency to match')
  return f'jax[{extra}]{match.group(1)}'


def runtime_version(accelerator_type: str) -> str:
  generation = accelerator_type.rsplit('-', 1)[0]
  if generation not in RUNTIME_VERSIONS:
    raise SystemExit(f'no default TPU software version for --accelerator-type={accelerator_type}: '
                     f'pass --version (see `gcloud compute tpus tpu-vm versions list --zone=...`)')
  return RUNTIME_VERSIONS[generation]


@dataclasses.dataclass(frozen=True)
class Target:
  """Where commands run: the workers of a TPU VM, a host over ssh, or this machine."""
  name: str | None = None      # TPU VM name
  zone: str | None = None
  project: str | None = None
  worker: str = 'all'          # TPU workers: 'all', '0', '0,2', ...
  host: str | None = None      # 'user@machine' (ssh) or 'local'
  remote_dir: str = 'reformer_jax'  # the repository there, relative to the home directory
  venv: str | None = None      # a virtual environment there, activated first
  env: tuple[str, ...] = ()    # KEY=VALUE exported first

  @property
  def kind(self) -> str:
    if self.host is None:
      return 'tpu'
    return 'local' if self.host == 'local' else 'ssh'

  @property
  def python(self) -> str:
    """The interpreter to name in commands: this one locally (no venv), else python3."""
    return sys.executable if self.kind == 'local' and not self.venv else 'python3'

  @property
  def repo(self) -> str:
    return str(REPO_ROOT) if self.kind == 'local' else self.remote_dir

  def location(self) -> list[str]:
    return ([f'--zone={self.zone}'] if self.zone else []) + (
        [f'--project={self.project}'] if self.project else [])

  def shell(self, script: str, *, worker: str | None = None) -> list[str]:
    """argv that runs the shell code `script` there (on `worker`, default `self.worker`)."""
    if self.kind == 'tpu':
      return [*GCLOUD_TPU, 'ssh', self.name, *self.location(), f'--worker={worker or self.worker}',
              f'--command={script}']
    if self.kind == 'ssh':
      return ['ssh', self.host, script]
    return ['bash', '-c', script]

  def copy_to(self, local: str, remote: str) -> list[str]:
    if self.kind == 'tpu':
      return [*GCLOUD_TPU, 'scp', local, f'{self.name}:{remote}', *self.location(),
              f'--worker={self.worker}']
    return ['scp', local, f'{self.host}:{remote}']

  def copy_from(self, remote: str, local: str, *, worker: str) -> list[str]:
    if self.kind == 'tpu':
      return [*GCLOUD_TPU, 'scp', f'{self.name}:{remote}', local, *self.location(),
              f'--worker={worker}', '--recurse']
    return ['scp', '-r', f'{self.host}:{remote}', local]

  def prologue(self) -> list[str]:
    """Shell steps before any command: activate the venv, export --env, cd into the repo."""
    steps = [f'. {self.venv}/bin/activate'] if self.venv else []
    for item in self.env:
      key, _, value = item.partition('=')
      steps.append(f'export {key}={shlex.quote(value)}')
    return [*steps, f'cd {shlex.quote(self.repo)}']

  def log_path(self, log_name: str) -> str:
    """This worker's log file, relative to the repo; `$W` is set by `worker_number()`."""
    return f'{LOGS_DIR}/{log_name}/' + ('worker-$W.log' if self.kind == 'tpu' else '$W.log')

  def worker_number(self) -> str:
    return f'W={WORKER_NUMBER}' if self.kind == 'tpu' else 'W=$(hostname)'


@dataclasses.dataclass(frozen=True)
class Step:
  """A command to run here, or (when `pack` is set) the archive `pack` builds (Python, here)."""
  argv: tuple[str, ...] = ()
  pack: tuple[tuple[pathlib.Path, str], ...] = ()  # (local folder, name inside the archive)
  archive: pathlib.Path | None = None

  def describe(self) -> str:
    if self.pack:
      parts = ', '.join(f'{name}/ <- {folder}' for folder, name in self.pack)
      return f'# pack {parts} into {self.archive} (git-tracked and untracked, unignored files)'
    return shlex.join(self.argv)


def remote_command(command: Sequence[str]) -> str:
  """One argument: shell code as given; several: an argv, quoted."""
  if not command:
    raise SystemExit('give the command to run after --, e.g. -- python3 -m reformer_jax.main ...')
  return command[0] if len(command) == 1 else shlex.join(command)


def run_script(target: Target, command: str, log_name: str, *, detach: bool) -> str:
  """Shell code: prologue, then `command` with its output appended to this worker's log."""
  log = target.log_path(log_name)
  steps = [*target.prologue(), target.worker_number(), f'mkdir -p {LOGS_DIR}/{log_name}']
  if detach:
    inner = shlex.quote(f'set -o pipefail; {command}')
    steps.append(f'{{ nohup bash -c {inner} >> {log} 2>&1 < /dev/null & }}')
    steps.append(f'echo "started on $(hostname) (worker $W): pid $!, log $PWD/{log}"')
    return ' && '.join(steps)
  return 'set -o pipefail; ' + ' && '.join(steps) + f' && ({command}) 2>&1 | tee -a {log}'


# --------------------------------------------------------------------------- subcommands


def create_steps(args, target: Target) -> list[Step]:
  if target.kind != 'tpu':
    raise SystemExit('create makes a TPU VM: give --name and --zone, not --host')
  version = args.version or runtime_version(args.accelerator_type)
  argv = [*GCLOUD_TPU, 'create', target.name, *target.location(),
          f'--accelerator-type={args.accelerator_type}', f'--version={version}']
  if args.spot:
    argv.append('--spot')
  return [Step(tuple(argv))]


def delete_steps(args, target: Target) -> list[Step]:
  if target.kind != 'tpu':
    raise SystemExit('delete removes a TPU VM: give --name and --zone, not --host')
  argv = [*GCLOUD_TPU, 'delete', target.name, *target.location()]
  if args.yes:
    argv.append('--quiet')
  return [Step(tuple(argv))]


def setup_steps(args, target: Target) -> list[Step]:
  """Copy (or clone) the repository, optionally the data, and install it on every worker."""
  steps: list[Step] = []
  parent = posixpath.dirname(target.remote_dir.rstrip('/')) or '.'
  remote = []
  if target.venv:
    venv = shlex.quote(target.venv)
    if args.python:  # a uv-managed interpreter of that version (TPU images ship Python 3.10)
      make = (f'python3 -m pip install --user --quiet uv && python3 -m uv venv --seed '
              f'--python {shlex.quote(args.python)} {venv}')
    else:
      make = f'python3 -m venv {venv}'
    remote.append(f'{{ [ -x {venv}/bin/python ] || {{ {make}; }}; }}')
    remote.append(f'. {venv}/bin/activate')
  pack = []
  if target.kind != 'local':
    if args.source == 'copy':
      pack.append((REPO_ROOT, posixpath.basename(target.remote_dir.rstrip('/'))))
    else:
      if not args.repo:
        raise SystemExit('--source=git needs --repo=URL (the repository to clone on the workers)')
      repo_dir = shlex.quote(target.remote_dir)
      clone = ['git', 'clone', *(['--branch', args.branch] if args.branch else []), args.repo,
               target.remote_dir]
      remote.append(f'{{ if [ -d {repo_dir}/.git ]; then git -C {repo_dir} pull --ff-only; '
                    f'else {shlex.join(clone)}; fi; }}')
    if args.data:  # beside the repository, where reformer_jax looks by default
      pack.append((pathlib.Path(args.data).resolve(), 'shared/data'))
  elif args.data:
    raise SystemExit('--data copies datasets to a remote machine; locally set REFORMER_DATA_DIR')
  if pack:
    archive = REPO_ROOT / 'workdir' / 'launch' / SETUP_ARCHIVE
    steps.append(Step(pack=tuple(pack), archive=archive))
    steps.append(Step(tuple(target.copy_to(str(archive), SETUP_ARCHIVE))))
    remote[:0] = ([f'mkdir -p {shlex.quote(parent)}'] if parent != '.' else []) + [
        f'tar -xzf {SETUP_ARCHIVE} -C {shlex.quote(parent)}', f'rm {SETUP_ARCHIVE}']
  install = [target.python, '-m', 'pip', 'install', '-e', '.']
  if args.jax != 'cpu':
    install.append(jax_requirement(args.jax))
  remote += [f'cd {shlex.quote(target.repo)}', shlex.join(install)]
  steps.append(Step(tuple(target.shell(' && '.join(remote)))))
  return steps


def run_steps(args, target: Target) -> list[Step]:
  log_name = args.log_name or datetime.datetime.now().strftime('run-%Y%m%d-%H%M%S')
  script = run_script(target, remote_command(args.command), log_name, detach=args.detach)
  return [Step(tuple(target.shell(script)))]


def sweep_steps(args, target: Target) -> list[Step]:
  spec = args.sweep
  if not (REPO_ROOT / spec.partition(':')[0]).is_file():
    raise SystemExit(f'{spec.partition(":")[0]} is not a file of this repository (give a path '
                     f'relative to its root, e.g. launch/sweeps/attention_timing.py)')
  argv = [target.python, '-m', 'launch.sweep', spec]
  if args.root:
    argv.append(f'--root={args.root}')
  if args.workdirs:
    argv.append(f'--workdirs={args.workdirs}')
  if args.only:
    argv += ['--only', *args.only]
  if args.sweep_args:
    argv += ['--', *args.sweep_args]
  log_name = args.log_name or 'sweep-' + re.sub(r'[^A-Za-z0-9._-]', '_',
                                                pathlib.Path(spec.partition(':')[0]).stem +
                                                (f'-{spec.partition(":")[2]}' if ':' in spec else ''))
  script = run_script(target, shlex.join(argv), log_name, detach=args.detach)
  return [Step(tuple(target.shell(script)))]


def fetch_steps(args, target: Target) -> list[Step]:
  """Copies remote paths (relative to the repository there) here, or to a gs:// bucket.

  A path that is a bucket URL (a run trained with `--workdir=gs://...`) is not on the machine:
  `gcloud storage rsync` copies it from here, to `--to/<its last name>`.
  """
  paths = args.paths or ['workdir']
  buckets = [p for p in paths if '://' in p]
  paths = [p for p in paths if '://' not in p]
  steps = []
  if buckets and '://' not in args.to:
    steps.append(Step(('mkdir', '-p', args.to)))
  steps += [Step(('gcloud', 'storage', 'rsync', '--recursive', p,
                  f'{args.to.rstrip("/")}/{posixpath.basename(p.rstrip("/"))}'))
            for p in buckets]
  if not paths:
    return steps
  if target.kind == 'local':
    raise SystemExit('fetch copies from a TPU VM or an ssh host; with --host=local the files are '
                     'already here (give gs:// paths to copy from a bucket)')
  worker = args.worker or '0'
  if args.to.startswith('gs://'):
    copies = [shlex.join(['gcloud', 'storage', 'rsync', '--recursive', p,
                          f'{args.to.rstrip("/")}/{posixpath.basename(p.rstrip("/"))}'])
              for p in paths]
    script = ' && '.join([*target.prologue(), *copies])
    steps.append(Step(tuple(target.shell(script, worker=worker))))
    return steps
  if not buckets:
    steps.append(Step(('mkdir', '-p', args.to)))
  for p in paths:
    remote = p if p.startswith(('/', '~')) else posixpath.join(target.remote_dir, p)
    steps.append(Step(tuple(target.copy_from(remote, args.to, worker=worker))))
  return steps


SUBCOMMANDS = {'create': create_steps, 'setup': setup_steps, 'run': run_steps,
               'sweep': sweep_steps, 'fetch': fetch_steps, 'delete': delete_steps}


# --------------------------------------------------------------------------- execution


def pack_archive(step: Step) -> None:
  """Writes `step.archive`: the repository's git-tracked and untracked-unignored files (what
  `git status` sees, so no workdirs, caches or .git), and every file of the other folders."""
  step.archive.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(step.archive, 'w:gz') as tar:
    for folder, name in step.pack:
      files = _repo_files() if folder == REPO_ROOT else sorted(
          str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())
      for rel in files:
        tar.add(folder / rel, arcname=posixpath.join(name, rel), recursive=False)


def _repo_files() -> list[str]:
  out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                       cwd=REPO_ROOT, capture_output=True, check=True).stdout
  return [n for n in out.decode().split('\0') if n and (REPO_ROOT / n).is_file()]


def execute(steps: Sequence[Step], *, dry_run: bool, out=None) -> int:
  """Prints each step (dry run) or prints and runs it, stopping at the first failure."""
  out = out or sys.stdout
  for step in steps:
    if dry_run:
      print(step.describe(), file=out)
      continue
    print(f'+ {step.describe()}', file=out, flush=True)
    if step.pack:
      pack_archive(step)
      continue
    if shutil.which(step.argv[0]) is None:
      hint = (' (install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install)'
              if step.argv[0] == 'gcloud' else '')
      raise SystemExit(f'{step.argv[0]} not found{hint}; --dry-run prints the commands instead')
    result = subprocess.run(step.argv, check=False)
    if result.returncode:
      print(f'exit code {result.returncode}: {step.describe()}', file=sys.stderr)
      return result.returncode
  return 0


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  if '--' in argv:
    cut = list(argv).index('--')
    argv, after = list(argv[:cut]), list(argv[cut + 1:])
  else:
    argv, after = list(argv), []
  target = argparse.ArgumentParser(add_help=False)
  g = target.add_argument_group('where')
  g.add_argument('--name', help='TPU VM name')
  g.add_argument('--zone', help='TPU VM zone, e.g. us-central2-b (default: gcloud\'s compute/zone)')
  g.add_argument('--project', help='Google Cloud project (default: gcloud\'s core/project)')
  g.add_argument('--host', help="a GPU machine instead of a TPU VM: user@machine (ssh) or 'local'")
  g.add_argument('--dry-run', action='store_true', help='print the exact commands, run nothing')
  remote = argparse.ArgumentParser(add_help=False)
  g = remote.add_argument_group('on the machine')
  g.add_argument('--worker', default=None,
                 help="TPU workers: 'all' (default for setup/run/sweep) or numbers; fetch: 0")
  g.add_argument('--remote-dir', default='reformer_jax',
                 help='the repository there, relative to the home directory')
  g.add_argument('--venv', default=None,
                 help="virtual environment there, created by setup and activated by run/sweep "
                      "(default reformer_venv on a TPU VM or ssh host, none locally; '' for none)")
  g.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                 help='exported before the command (repeatable)')
  logs = argparse.ArgumentParser(add_help=False)
  logs.add_argument('--log-name', default=None,
                    help='logs go to workdir/logs/<log name>/worker-<N>.log there')
  logs.add_argument('--detach', action='store_true',
                    help='start with nohup and return; the job survives the ssh session')

  p = argparse.ArgumentParser(prog='python -m launch.tpu_vm', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='subcommand', required=True)
  c = sub.add_parser('create', parents=[target], help='create a TPU VM')
  c.add_argument('--accelerator-type', default='v4-8', help='e.g. v4-8, v5litepod-8, v6e-8, v4-32')
  c.add_argument('--version', default=None,
                 help='TPU software version; default by generation: '
                      + ', '.join(f'{k}: {v}' for k, v in RUNTIME_VERSIONS.items()))
  c.add_argument('--spot', action='store_true', help='a Spot TPU VM (preemptible, cheaper)')
  s = sub.add_parser('setup', parents=[target, remote],
                     help='copy or clone the repository and pip install it (and jax[tpu]) there')
  s.add_argument('--source', choices=('copy', 'git'), default='copy',
                 help='copy this working tree (default) or git clone --repo')
  s.add_argument('--repo', help='git URL to clone (--source=git)')
  s.add_argument('--branch', help='branch to clone (--source=git)')
  s.add_argument('--data', help='local datasets folder copied to shared/data beside the repository')
  s.add_argument('--jax', default=None, choices=('tpu', 'cuda12', 'cuda13', 'cpu'),
                 help='the jax extra to install: default tpu on TPU VMs, cuda12 with --host')
  s.add_argument('--python', default=None,
                 help=f'create the venv with this Python version through uv (default '
                      f'{TPU_PYTHON} on TPU VMs; with --host the host\'s python3, or give one)')
  sub.add_parser('run', parents=[target, remote, logs],
                 help='run a command on every worker (after --)')
  w = sub.add_parser('sweep', parents=[target, remote, logs],
                     help='run `python -m launch.sweep` there; arguments after -- go to its runs')
  w.add_argument('sweep', help='sweep file (relative to the repository) and optional :arg')
  w.add_argument('--root', help='the sweep root there (default workdir/sweeps/<sweep name>)')
  w.add_argument('--workdirs', help='parent of the run workdirs, e.g. gs://bucket/sweep')
  w.add_argument('--only', nargs='+', help='only runs whose names match these globs')
  f = sub.add_parser('fetch', parents=[target, remote],
                     help='copy results and checkpoints here, or to a gs:// bucket')
  f.add_argument('paths', nargs='*', help='paths there, relative to the repository (default '
                 'workdir), or gs:// workdirs (copied from the bucket by gcloud here)')
  f.add_argument('--to', required=True, help='local folder, or gs://bucket/path')
  d = sub.add_parser('delete', parents=[target], help='delete a TPU VM')
  d.add_argument('--yes', action='store_true', help="don't ask for confirmation (gcloud --quiet)")
  args = p.parse_args(argv)
  if after and args.subcommand not in ('run', 'sweep'):
    p.error(f'{args.subcommand} takes no arguments after --')
  args.command = after if args.subcommand == 'run' else []
  args.sweep_args = after if args.subcommand == 'sweep' else []
  if args.host is None and not args.name:
    p.error('give --name (a TPU VM) or --host (user@machine, or local)')
  if args.host is not None and (args.name or args.zone or args.project):
    p.error('--host replaces --name/--zone/--project: give one or the other')
  return args


def make_target(args) -> Target:
  worker = getattr(args, 'worker', None)
  if args.subcommand != 'fetch':
    worker = worker or 'all'
  venv = getattr(args, 'venv', None)
  if venv is None and args.host != 'local':
    venv = DEFAULT_VENV
  if args.host is not None and worker not in (None, 'all', '0'):
    raise SystemExit('--worker applies to TPU VMs; an ssh host has one')
  return Target(name=args.name, zone=args.zone, project=args.project, worker=worker or 'all',
                host=args.host, remote_dir=getattr(args, 'remote_dir', 'reformer_jax'),
                venv=venv or None, env=tuple(getattr(args, 'env', ())))


def main(argv: Sequence[str] | None = None, out=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.subcommand == 'setup':
    if args.jax is None:
      args.jax = 'tpu' if args.host is None else 'cuda12'
    if args.python is None and args.host is None:
      args.python = TPU_PYTHON
  target = make_target(args)
  for item in target.env:
    if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', item, flags=re.S):
      raise SystemExit(f'--env {item!r}: use KEY=VALUE')
  steps = SUBCOMMANDS[args.subcommand](args, target)
  return execute(steps, dry_run=args.dry_run, out=out)


if __name__ == '__main__':
  sys.exit(main())
