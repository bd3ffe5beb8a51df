"""torchx components: validated arguments, and real multi-node specs rendered with --dryrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.components import train

REPO = Path(__file__).resolve().parents[2]
TORCHX = str(Path(sys.executable).parent / "torchx")


def test_component_builds_torchrun_job() -> None:
    app = train("training.max_steps=5", config="configs/default.yaml", j="2x4")
    role = app.roles[0]
    assert role.num_replicas == 2
    args = " ".join(role.args)
    assert "--nnodes 2" in args and "--nproc_per_node 4" in args
    assert "-m trainer.commands.cli train configs/default.yaml training.max_steps=5" in args


@pytest.mark.parametrize("kwargs, needle", [
    ({"j": "2"}, "-j must be"),
    ({"j": "0x2"}, "-j must be"),
    ({"config": "configs/default.json"}, "YAML"),
    ({"max_retries": -1}, "max_retries"),
])
def test_component_rejects_bad_arguments(kwargs, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        train(**kwargs)


def test_component_rejects_bad_override() -> None:
    with pytest.raises(ValueError, match="section.key=value"):
        train("epochs=3")


def _torchx(*args: str) -> str:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run([TORCHX, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_slurm_dryrun_renders_two_nodes_of_eight_gpus() -> None:
    out = _torchx("run", "--dryrun", "-s", "slurm", "launch/components.py:train", "-j", "2x8", "--gpu", "8",
                  "--config", "configs/criteo_tb_dlrmv2.yaml")
    assert "#SBATCH" in out and "--gpus-per-task=8" in out and "hetjob" in out
    assert "--cpus-per-task=64" in out and "--mem=393216" in out  # 8 CPUs and 48 GiB per GPU process
    assert "--nnodes 2 --nproc_per_node 8" in out and "-m trainer.commands.cli train configs/criteo_tb_dlrmv2.yaml" in out


def test_kubernetes_dryrun_renders_job() -> None:
    out = _torchx("run", "--workspace", "", "--dryrun", "-s", "kubernetes", "launch/components.py:train",
                  "-j", "2x8", "--gpu", "8", "--config", "configs/criteo_tb_dlrmv2.yaml")
    assert "kind: Job" in out and "nvidia.com/gpu: '8'" in out and "--nnodes 2 --nproc_per_node 8" in out


def test_component_help_comes_from_docstring() -> None:
    out = _torchx("run", "-s", "local_cwd", "launch/components.py:train", "--help")
    assert "NNODESxNPROC_PER_NODE" in out and "section.key=value" in out
    assert "default 8 per process on GPU nodes" in out and "393216 for -j Nx8 --gpu 8" in out


@pytest.mark.parametrize("kwargs,expected", [
    ({"j": "2x8", "gpu": 8}, (64, 8, 393216)),  # an 8-GPU node: 8 CPUs and 48 GiB per process
    ({"j": "1x4"}, (8, 0, 32768)),  # CPU training: 2 CPUs and 8 GiB per process
    ({"j": "1x2", "cpu": 16, "memMB": 4096}, (16, 0, 4096)),  # given values win
    ({"j": "4x8", "gpu": 8, "h": "aws_p4d.24xlarge"}, (96, 8, 1132416)),  # a torchx named resource wins
])
def test_resources_follow_the_request(kwargs, expected) -> None:
    resource = train(config="configs/criteo_tb_dlrmv2.yaml", **kwargs).roles[0].resource
    assert (resource.cpu, resource.gpu, resource.memMB) == expected


def test_component_checks_gpus_and_the_config_before_a_job_exists() -> None:
    from trainer.strict import ConfigError

    with pytest.raises(ValueError, match=r"--gpu 8 with -j 2x4: each training process drives one GPU"):
        train(j="2x4", gpu=8)
    with pytest.raises(ConfigError, match="model.arch"):
        train("model.arch=transformer", config="configs/default.yaml")
    with pytest.raises(ValueError, match="no such file"):
        train(config="configs/nope.yaml")


def test_restarts_add_torchrun_max_restarts_and_resume_auto() -> None:
    role = train("training.max_steps=3", max_restarts=2).roles[0]
    command = role.args[-1]
    assert command.startswith("torchrun --max_restarts 2 ") and command.endswith("training.resume=auto")
    # scheduler-level retries also resume; an explicit training.resume override is kept as given
    assert train(max_retries=1).roles[0].args[-1].endswith("training.resume=auto")
    explicit = train("training.resume=latest", max_restarts=1).roles[0].args[-1]
    assert explicit.count("training.resume=") == 1 and "training.resume=latest" in explicit
    plain = train().roles[0].args[-1]
    assert "--max_restarts" not in plain and "training.resume" not in plain
