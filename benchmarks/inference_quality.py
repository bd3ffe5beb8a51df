"""Validation AUC of inference artifacts at each table precision against the fp32 artifact, per method.

For each preset: train one run on the ``small`` synthetic log (single process, through the real CLI, with a
checkpoint at the end), ``compactrec export`` it at every precision and ``compactrec score`` the validation
split; the fp32 artifact must reproduce the training run's own validation AUC, and every other precision is
reported as its AUC difference to fp32. Resumable: a finished run, artifact or score is not redone; results go to
``--out`` (JSON) after every score.

    .venv/bin/compactrec generate small --out data/synthetic-small
    PYTHONPATH=. .venv/bin/python benchmarks/inference_quality.py --out benchmarks/results/inference_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["default", "memrec_small", "robe_small", "hash_small", "lma_small", "qr_small"]
PRECISIONS = ["fp32", "fp16", "int8", "int4"]


def _run(cmd: List[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--data", default="data/synthetic-small")
    p.add_argument("--work", default="runs/inference_quality", help="run directories and artifacts")
    p.add_argument("--out", default="benchmarks/results/inference_quality.json")
    p.add_argument("--threads", type=int, default=1, help="scoring threads")
    args = p.parse_args()
    exe = str(Path(sys.executable).parent / "compactrec")
    work = REPO / args.work
    work.mkdir(parents=True, exist_ok=True)
    out = REPO / args.out
    results: Dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results["commands"] = {"generate": f"compactrec generate small --out {args.data}",
                           "script": "PYTHONPATH=. .venv/bin/python benchmarks/inference_quality.py"}
    for preset in args.presets.split(","):
        run = work / preset
        overrides = [f"data.path={args.data}", f"training.run_dir={run}", "training.progress_bar=false",
                     "training.checkpoint_every=100000", "training.final_test=false"]
        if preset.startswith("lma"):
            overrides.append(f"embeddings.options.index_path={work / 'lma_index.npz'}")
        config = str(REPO / "configs" / f"{preset}.yaml")
        log = work / f"{preset}.log"
        entry = results["runs"].setdefault(preset, {"overrides": overrides, "scores": {}})
        if not (run / "metrics.json").exists():
            if preset.startswith("lma"):
                _run([exe, "prepare", config, *overrides], log)
            t = time.time()
            _run([exe, "train", config, *overrides], log)
            entry["train_seconds"] = time.time() - t
        metrics = json.loads((run / "metrics.json").read_text())
        entry["training_val"] = {k: metrics["val"][k] for k in ("auc", "logloss", "samples")}
        entry["train_samples_per_s"] = metrics["samples_per_s"]
        for precision in args.precisions.split(","):
            if precision in entry["scores"]:
                continue
            artifact = work / f"{preset}.{precision}.pt"
            if not artifact.exists():
                _run([exe, "export", config, *overrides, "--out", str(artifact), "--precision", precision], log)
            proc = subprocess.run([exe, "score", str(artifact), "--json", "--no-progress", "--threads",
                                   str(args.threads)], capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise RuntimeError(f"score {artifact} failed: {proc.stderr[-2000:]}")
            score = json.loads(proc.stdout)
            score.pop("data", None)
            score["artifact_bytes"] = artifact.stat().st_size
            entry["scores"][precision] = score
            fp32 = entry["scores"].get("fp32")
            delta = f"  dAUC vs fp32 {score['auc'] - fp32['auc']:+.6f}" if fp32 else ""
            print(f"{preset:14s} {precision}: AUC {score['auc']:.6f} logloss {score['logloss']:.6f} "
                  f"(training val AUC {entry['training_val']['auc']:.6f}){delta}", flush=True)
            results["loadavg"] = os.getloadavg()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
