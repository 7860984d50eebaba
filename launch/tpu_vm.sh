#!/usr/bin/env bash
# launch/tpu_vm.sh SUBCOMMAND [...]  ==  python -m launch.tpu_vm SUBCOMMAND [...]
# (create | setup | run | sweep | fetch | delete; every one takes --dry-run). Works from any
# directory; relative paths (--data, --to) stay relative to where you are.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}" exec "${PYTHON:-python3}" -m launch.tpu_vm "$@"
