"""The library example (examples/dlrm_dcn_drop_in.py) run as a user runs it, on 2 gloo ranks.

For every CompactRec module (and a stock EmbeddingBagCollection): a stock ``EmbeddingShardingPlanner`` with no
constraints plans it inside a stock ``DLRM_DCN``, DMP shards it with the module's sharders,
``TrainPipelineSparseDist`` trains it with the module *pipelined*, every table learns, DCP writes a checkpoint
and the unsharded model loaded from it in one process scores like the sharded one. Once more through the
script's own ``torchrun`` entry point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

from tests.dist_utils import run_multiprocess

REPO = Path(__file__).resolve().parents[2]
SHARDED = {"full": "ShardedEmbeddingBagCollection", "memrec": "ShardedMemRecEmbeddingBag"}
TABLES = {"full": {"t_user", "t_item", "t_ad", "t_context"}, "memrec": {"memrec_tokens"},
          "hash": {"hash_user", "hash_item", "hash_ad", "hash_context"}, "robe": {"robe_memory"},
          "lma": {"lma_memory"}, "qr": {"qr_quotient", "qr_remainder"}}


def _every_kind(rank: int, world: int, root: str) -> Dict[str, Any]:
    from examples.dlrm_dcn_drop_in import KINDS, run

    return {kind: run(kind, os.path.join(root, kind), torch.device("cpu"), steps=3) for kind in KINDS}


def test_every_module_plans_shards_trains_pipelined_checkpoints_and_serves(tmp_path: Path) -> None:
    results: List[Dict[str, Any]] = run_multiprocess(_every_kind, world_size=2, args=(str(tmp_path),))
    for kind, tables in TABLES.items():
        r0, r1 = results[0][kind], results[1][kind]
        assert set(r0["plan"]) == tables, (kind, r0["plan"])  # the planner placed every table, nothing else
        assert r0["sharded_type"] == SHARDED.get(kind, "ShardedRemappedEmbeddingBagCollection")
        assert r0["is_pipelined"] and r1["is_pipelined"], kind
        for r in (r0, r1):
            assert r["trained"] and all(r["trained"].values()), (kind, r["trained"])
            assert r["max_inference_error"] < 1e-5, (kind, r["max_inference_error"])
        assert r0["replicated"] == r1["replicated"]  # MEM-REC's weight table: replicated by DDP, bit for bit
    assert list(results[0]["memrec"]["replicated"]) == ["model.sparse_arch.embedding_bag_collection.weight_table"]


def test_the_script_runs_under_torchrun(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2",
                           "examples/dlrm_dcn_drop_in.py", "--kind", "memrec", "--checkpoint", str(tmp_path / "ckpt"),
                           "--steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memrec: plan {'memrec_tokens': ('row_wise', 'fused')}; ShardedMemRecEmbeddingBag pipelined: True" in \
        done.stdout, done.stdout
    assert (tmp_path / "ckpt" / ".metadata").is_file()
