"""A rank of a running torchx job is killed (SIGKILL) mid-epoch: torchrun restarts the worker group
(launch.max_restarts=1), the restarted ranks resume from the newest checkpoint (training.resume=auto, added by
the component), and the job ends with exactly the parameters, optimizer state and metrics of a job that was
never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from tests.conftest import memrec_rows, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid in /proc")


def _env() -> dict:
    return dict(os.environ, PATH=str(BIN) + os.pathsep + os.environ["PATH"], PYTHONUNBUFFERED="1")


def _command(data: Path, run: Path, *extra: str) -> List[str]:
    # 15,000 train rows / (2 x 32) = 234 steps in the epoch; a checkpoint every 40 steps
    return [str(BIN / "compactrec"), "train", "configs/memrec_small.yaml", "--nproc", "2",
            *tiny_overrides(data, run), "data.batch_size=32", "training.epochs=1", "training.evals_per_epoch=2",
            *memrec_rows(2000), "training.checkpoint_every=40", "training.keep_checkpoints=2",
            "training.log_every=50", *extra]


def _rank_pid(run: Path, rank: int) -> Optional[int]:
    """The pid of the worker process with RANK=rank whose command line names ``run``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (f"training.run_dir={run}".encode() in cmdline and b"trainer.commands.cli" in cmdline
                and f"RANK={rank}".encode() in environ):
            return int(proc.name)
    return None


def _final_state(run: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpts = sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    out = run / "final.pt"
    dcp_to_torch_save(ckpts[-1], out)
    return torch.load(out, weights_only=False)


def _flat(state: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_killed_rank_restarts_and_resumes_to_the_uninterrupted_result(tiny_dataset: Path, tmp_path: Path) -> None:
    killed_run = tmp_path / "killed"
    job = subprocess.Popen(_command(tiny_dataset, killed_run, "launch.max_restarts=1"), cwd=REPO, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        marker = killed_run / "checkpoints" / "step_40" / "COMPLETE.json"
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert job.poll() is None, job.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "no checkpoint at step 40 within 300 s"
            time.sleep(0.02)
        pid = _rank_pid(killed_run, 1)
        assert pid is not None, "rank 1's process not found"
        os.kill(pid, signal.SIGKILL)
        # the kill landed mid-run: the job had not finished
        assert not (killed_run / "metrics.json").exists()
        out, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-6000:]
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert resumed, out[-6000:]
    step = int(resumed[0].split("step_")[1].split(":")[0])
    assert 40 <= step < 234 and step % 40 == 0, resumed[0]

    clean_run = tmp_path / "clean"
    clean = subprocess.run(_command(tiny_dataset, clean_run), cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert clean.returncode == 0, (clean.stdout + clean.stderr)[-4000:]
    a, b = _flat(_final_state(killed_run)), _flat(_final_state(clean_run))
    assert a.keys() == b.keys() and any("memrec_tokens" in k for k in a)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    m_killed = json.loads((killed_run / "metrics.json").read_text())
    m_clean = json.loads((clean_run / "metrics.json").read_text())
    assert m_killed["steps"] == m_clean["steps"] == 234
    assert m_killed["val"] == m_clean["val"] and m_killed["test"] == m_clean["test"]
    assert [e["step"] for e in m_killed["evals"]] == [e["step"] for e in m_clean["evals"]] == [117, 234]
