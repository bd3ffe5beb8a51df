"""torchx components for CompactRec jobs (no postponed annotations: torchx reads the real types).

Each component is a typed function returning an ``AppDef``; torchx turns its docstring into ``--help``.
Examples (from the repository root, with the virtualenv active)::

    torchx run -s local_cwd launch/components.py:train -j 1x2 --config configs/default.yaml
    torchx run -s local_cwd launch/components.py:train -j 2x2 --config configs/default.yaml training.max_steps=50
    torchx run --dryrun -s slurm launch/components.py:train -j 16x8 --gpu 8 --config configs/criteo_tb_dlrmv2.yaml
"""


import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torchx.specs as specs
from torchx.components import dist

_J = re.compile(r"^(\d+)(:\d+)?x(\d+)$")

# Per-node resources when --cpu / --memMB are not given, per training process of the node: a GPU process needs
# host CPUs and RAM for its data loading (memory-mapped days, multi-hot expansion) and the CPU-side work of its
# GPU; a CPU process computes on its CPUs. 8 GPUs -> 64 CPUs and 384 GiB, which fits the common 8-GPU nodes
# (e.g. torchx's named resources aws_p3.16xlarge: 64 CPUs / 468 GiB, aws_p4d.24xlarge: 96 / 1106 GiB).
CPUS_PER_GPU_PROCESS = 8
MEM_MB_PER_GPU_PROCESS = 48 * 1024
CPUS_PER_CPU_PROCESS = 2
MEM_MB_PER_CPU_PROCESS = 8 * 1024


def _check_job_shape(j: str) -> int:
    """The processes per node of ``-j``."""
    match = _J.match(j)
    if not match or int(match.group(1)) < 1 or int(match.group(3)) < 1:
        raise ValueError(f"-j must be NNODESxNPROC_PER_NODE (e.g. 1x2, 2x8), got {j!r}")
    return int(match.group(3))


def node_resources(nproc_per_node: int, gpu: int, cpu: Optional[int], memMB: Optional[int]) -> Tuple[int, int]:
    """(CPUs, memory MB) per node: as given, else following the request (``CPUS_PER_*`` per process)."""
    per_cpu, per_mem = ((CPUS_PER_GPU_PROCESS, MEM_MB_PER_GPU_PROCESS) if gpu
                        else (CPUS_PER_CPU_PROCESS, MEM_MB_PER_CPU_PROCESS))
    return (cpu if cpu is not None else per_cpu * nproc_per_node,
            memMB if memMB is not None else per_mem * nproc_per_node)


def _check_config(config: str, overrides: List[str]) -> None:
    """Load the config strictly here, before a job exists, when it is found relative to this directory (the
    job's working directory for local_cwd and for workspace-based schedulers); an image-only path is left to
    the job."""
    if not config.endswith((".yaml", ".yml")):
        raise ValueError(f"--config must be a YAML preset, got {config!r}")
    if Path(config).is_file():
        from trainer.config import load_config

        load_config(config, overrides)
    elif not Path(config).is_absolute():
        raise ValueError(f"--config {config!r}: no such file relative to {Path.cwd()} (the job's working directory)")


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
    cpu: Optional[int] = None,
    gpu: int = 0,
    memMB: Optional[int] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """CompactRec distributed training (DLRM / DLRM-DCN with full, MEM-REC, LMA or baseline tables).

    Runs ``python -m trainer.commands.cli train CONFIG OVERRIDES`` on every worker under torchrun: gloo on CPU
    workers, NCCL on GPU workers.

    Args:
        overrides: config overrides as section.key=value (e.g. optimizer.sparse_lr=0.1)
        config: YAML preset, relative to the job's working directory (the repo root for local_cwd)
        j: NNODESxNPROC_PER_NODE, e.g. 1x2 (one node, 2 processes) or 16x8
        image: container image (ignored by local_cwd)
        name: job name
        h: torchx named resource of the node (e.g. aws_p4d.24xlarge); overrides cpu/gpu/memMB
        cpu: CPUs per node; default 8 per process on GPU nodes (--gpu > 0), 2 per process on CPU nodes,
            i.e. 64 for -j Nx8 --gpu 8
        gpu: GPUs per node (0 for CPU training); one training process per GPU, so it must equal the
            processes per node of -j
        memMB: memory per node in MB; default 49152 (48 GiB) per process on GPU nodes, 8192 per process on
            CPU nodes, i.e. 393216 for -j Nx8 --gpu 8
        env: extra environment variables, e.g. NCCL_DEBUG=INFO
        max_retries: scheduler restarts of the whole job after a failure (Kubernetes, Slurm; not local_cwd)
        max_restarts: torchrun restarts of the worker group when a rank dies (any scheduler). With either
            retry count > 0 the job runs with training.resume=auto (unless an override sets training.resume),
            so a restarted attempt continues from the newest checkpoint (set training.checkpoint_every)
        rdzv_port: c10d rendezvous port on the first node
        mounts: bind/volume mounts for container schedulers (see torchx dist.ddp)
    """
    nproc_per_node = _check_job_shape(j)
    _check_overrides(list(overrides))
    if gpu < 0 or max_retries < 0 or max_restarts < 0:
        raise ValueError("need gpu >= 0, max_retries >= 0 and max_restarts >= 0")
    if h is None and gpu and gpu != nproc_per_node:
        raise ValueError(f"--gpu {gpu} with -j {j}: each training process drives one GPU, so --gpu must equal the "
                         f"processes per node ({nproc_per_node})")
    cpu, memMB = node_resources(nproc_per_node, gpu, cpu, memMB)
    if cpu < 1 or memMB < 256:
        raise ValueError(f"need cpu >= 1 and memMB >= 256, got {cpu} and {memMB}")
    _check_config(config, list(overrides))
    overrides = tuple(overrides)
    if (max_retries or max_restarts) and not any(o.startswith("training.resume=") for o in overrides):
        overrides += ("training.resume=auto",)
    run_env = {"PYTHONUNBUFFERED": "1"}
    run_env.update(env or {})
    app = dist.ddp(
        "train", config, *overrides,
        m="trainer.commands.cli",
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
