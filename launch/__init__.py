"""Launching runs: sweeps on one machine (`launch.sweep`), TPU VMs and GPU hosts (`launch.tpu_vm`).

Outside the package: these modules only call `reformer_jax` and the experiments through their
command lines, and read what a run leaves in its workdir (`config.json`, `metrics.jsonl`).
"""

import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
