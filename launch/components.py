"""torchx components for CompactRec jobs (no postponed annotations: torchx reads the real types).

Each component is a typed function returning an ``AppDef``; torchx turns its docstring into ``--help``.
Examples (from the repository root, with the virtualenv active)::

    torchx run -s local_cwd launch/components.py:train -j 1x2 --config configs/default.yaml
    torchx run -s local_cwd launch/components.py:train -j 2x2 --config configs/default.yaml training.max_steps=50
    torchx run --dryrun -s slurm launch/components.py:train -j 16x8 --gpu 8 --config configs/criteo_tb.yaml
"""


import re
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

_J = re.compile(r"^(\d+)(:\d+)?x(\d+)$")


def _check_job_shape(j: str) -> None:
    match = _J.match(j)
    if not match or int(match.group(1)) < 1 or int(match.group(3)) < 1:
        raise ValueError(f"-j must be NNODESxNPROC_PER_NODE (e.g. 1x2, 2x8), got {j!r}")


def _check_overrides(overrides: List[str]) -> None:
    for text in overrides:
        key = text.split("=", 1)[0]
        if "=" not in text or key.count(".") < 1 or not all(key.split(".")):
            raise ValueError(f"override {text!r} must look like section.key=value")


def train(
    *overrides: str,
    config: str = "configs/default.yaml",
    j: str = "1x2",
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    name: str = "/compactrec",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """CompactRec distributed training (DLRM / DLRM-DCN with full, MEM-REC, LMA or baseline tables).

    Runs ``python -m trainer.cli train CONFIG OVERRIDES`` on every worker under torchrun: gloo on CPU
    workers, NCCL on GPU workers.

    Args:
        overrides: config overrides as section.key=value (e.g. optimizer.sparse_lr=0.1)
        config: YAML preset, relative to the job's working directory (the repo root for local_cwd)
        j: NNODESxNPROC_PER_NODE, e.g. 1x2 (one node, 2 processes) or 16x8
        image: container image (ignored by local_cwd)
        name: job name
        h: named resource (e.g. a cluster's host type); overrides cpu/gpu/memMB
        cpu: CPUs per node
        gpu: GPUs per node (0 for CPU training)
        memMB: memory per node in MB
        env: extra environment variables, e.g. NCCL_DEBUG=INFO
        max_retries: scheduler restarts of the whole job after a failure (Kubernetes, Slurm; not local_cwd)
        max_restarts: torchrun restarts of the worker group when a rank dies (any scheduler). With either
            retry count > 0 the job runs with training.resume=auto (unless an override sets training.resume),
            so a restarted attempt continues from the newest checkpoint (set training.checkpoint_every)
        rdzv_port: c10d rendezvous port on the first node
        mounts: bind/volume mounts for container schedulers (see torchx dist.ddp)
    """
    _check_job_shape(j)
    _check_overrides(list(overrides))
    if not config.endswith((".yaml", ".yml")):
        raise ValueError(f"--config must be a YAML preset, got {config!r}")
    if gpu < 0 or cpu < 1 or memMB < 256 or max_retries < 0 or max_restarts < 0:
        raise ValueError("need gpu >= 0, cpu >= 1, memMB >= 256, max_retries >= 0 and max_restarts >= 0")
    overrides = tuple(overrides)
    if (max_retries or max_restarts) and not any(o.startswith("training.resume=") for o in overrides):
        overrides += ("training.resume=auto",)
    run_env = {"PYTHONUNBUFFERED": "1"}
    run_env.update(env or {})
    app = dist.ddp(
        "train", config, *overrides,
        m="trainer.cli",
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=run_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    if max_restarts:
        role = app.roles[0]
        command = role.args[-1]
        if not command.startswith("torchrun "):
            raise RuntimeError(f"unexpected torchx ddp command {command!r}: cannot add --max_restarts")
        role.args[-1] = f"torchrun --max_restarts {max_restarts} " + command[len("torchrun "):]
    return app
