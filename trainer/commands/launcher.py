"""``compactrec train --nproc N``: launch this repository's training as a torchx job and follow it."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)


def launch_local(config: str, overrides: Sequence[str], nnodes: int, nproc_per_node: int,
                 scheduler: str = "local_cwd", max_retries: int = 0, max_restarts: int = 0) -> int:
    """Run ``launch.components.train`` on ``scheduler`` and stream replica 0's output; returns an exit code."""
    from torchx.runner import get_runner
    from torchx.specs import AppState

    from launch.components import train

    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"--nproc and --nnodes must be >= 1, got {nproc_per_node} and {nnodes}")
    # torchrun must come from this interpreter's environment (local_cwd runs it from PATH)
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    app = train(*overrides, config=config, j=f"{nnodes}x{nproc_per_node}", max_retries=max_retries,
                max_restarts=max_restarts, env={"PATH": os.environ["PATH"]})
    with get_runner("compactrec") as runner:
        handle = runner.run(app, scheduler=scheduler, cfg={"log_dir": str(Path("runs/torchx").resolve())})
        logger.info("launched %s", handle)
        role = app.roles[0].name
        # replica 0 runs torchrun for this node: its log carries every local rank's output, prefixed [rank]
        for line in runner.log_lines(handle, role, k=0, should_tail=True):
            print(line, end="" if line.endswith("\n") else "\n", flush=True)
        status = runner.wait(handle, wait_interval=1)
    if status is None or status.state != AppState.SUCCEEDED:
        print(f"torchx job {handle} ended {status.state if status else 'unknown'}; logs under runs/torchx",
              file=sys.stderr)
        return 1
    return 0
