"""Does fbgemm's CPU TBE backward (fused SGD) cost grow with the table's row count at a fixed batch?

One table, dim 128, 2048*26 uniform ids per step, rows N in --rows; median of --repeats fwd and fwd+bwd.
    PYTHONPATH=. .venv/bin/python benchmarks/tbe_backward_rows.py
"""
import argparse
import statistics
import time

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

p = argparse.ArgumentParser()
p.add_argument("--rows", default="75000,300000,1200000,4800000")
p.add_argument("--dim", type=int, default=128)
p.add_argument("--ids", type=int, default=2048 * 26)
p.add_argument("--repeats", type=int, default=7)
a = p.parse_args()
for n in [int(x) for x in a.rows.split(",")]:
    tbe = SplitTableBatchedEmbeddingBagsCodegen([(n, a.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.01)
    idx = torch.randint(0, n, (a.ids,), dtype=torch.int64)
    off = torch.arange(a.ids + 1, dtype=torch.int64)
    g = torch.randn(a.ids, a.dim)
    f, t = [], []
    for _ in range(a.repeats + 1):
        s = time.perf_counter()
        with torch.no_grad():
            tbe(idx, off)
        f.append(time.perf_counter() - s)
        s = time.perf_counter()
        (tbe(idx, off) * g).sum().backward()
        t.append(time.perf_counter() - s)
    print(f"rows {n:>9,}  fwd {1e3 * statistics.median(f[1:]):8.1f} ms   fwd+bwd+sgd {1e3 * statistics.median(t[1:]):8.1f} ms",
          flush=True)
    del tbe
