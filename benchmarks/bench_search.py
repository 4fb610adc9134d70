"""What one candidate of `dppa-stream search` costs, next to a full merge, side by side in one run.

A search runs pass 1 once and plans every candidate from the stored statistics (the histograms and
signals do not depend on the factors, rates or lambda), so the merge part of an evaluation should
cost about one pass 2. On one synthetic set (base + 2 fine-tunes, bf16, warm page cache):
- `dppa-stream merge` of the DPPA config (pass 1 + plan + pass 2), measured as a process tree;
- `dppa-stream search --tune factors,rates --strategy tpe --max-evals N` on the same config with an
  evaluation command that only prints a number, so the search's time is its own: it reports pass 1
  (once) and, per evaluation, the merge part (plan + pass 2) and the command's time.
Prints the per-evaluation merge time next to the merge's pass 2 (its time less the search's pass 1)
and next to the whole merge; JSON in benchmarks/results/bench_search.json.

    python benchmarks/bench_search.py            # ~60M parameters per model (the --small set of the others)
    python benchmarks/bench_search.py --big      # the ~0.5B set
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (BIG, DATA_DIR, DPPA_BIN, SMALL, code_version, dataset, dppa_cmd, input_bytes,  # noqa: E402
                    run_measured, save_result, write_config)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--evals", type=int, default=8)
    args = ap.parse_args()
    shape = BIG if args.big else SMALL
    paths = dataset(shape, 2, torch.bfloat16)
    work = os.path.join(DATA_DIR, "bench_search")
    os.makedirs(work, exist_ok=True)
    cfg = os.path.join(work, "dppa.yml")
    write_config(cfg, "dppa", paths[0], [(p, {}) for p in paths[1:]], {"amplification": [1.8, 1.0]}, dtype=None)
    merged, found = os.path.join(work, "merged"), os.path.join(work, "found")
    report = os.path.join(work, "merge.json")
    # untimed: a fresh install compiles its numba kernels on the first merge; the inputs get cached
    warm = run_measured(dppa_cmd(cfg, merged, report))
    if warm.rc != 0:
        print(warm.stderr_tail, file=sys.stderr)
        return 1
    m = run_measured(dppa_cmd(cfg, merged, report))
    with open(report) as f:
        mr = json.load(f)
    merge_s = mr["wall_seconds"] - mr["startup_seconds"]
    shutil.rmtree(found, ignore_errors=True)
    shutil.rmtree(found + ".search", ignore_errors=True)
    s = run_measured([DPPA_BIN, "search", cfg, found, "--eval-cmd", "echo 0.5", "--tune", "factors,rates",
                      "--strategy", "tpe", "--max-evals", str(args.evals), "--quiet"])
    if s.rc != 0 or m.rc != 0:
        print(s.stderr_tail or m.stderr_tail, file=sys.stderr)
        return 1
    with open(os.path.join(found, "search_log.json")) as f:
        log = json.load(f)
    per_eval = [e["merge_seconds"] for e in log["evaluations"]]
    pass1 = log["pass1_seconds"]
    pass2 = merge_s - pass1
    med = statistics.median(per_eval)
    rows = {"merge_wall_s": m.wall_s, "merge_cpu_s": m.cpu_s, "merge_s_without_startup": merge_s,
            "search_wall_s": s.wall_s, "search_cpu_s": s.cpu_s, "search_pass1_s": pass1,
            "merge_pass2_s": pass2, "evaluation_merge_s": per_eval, "evaluation_merge_median_s": med,
            "evaluation_command_median_s": statistics.median(e["eval_seconds"] for e in log["evaluations"]),
            "ratio_to_pass2": med / pass2, "ratio_to_merge": med / merge_s,
            "rates_tried": sorted({tuple(e["rates"]) for e in log["evaluations"]})}
    print(f"merge (pass 1 + plan + pass 2):   {merge_s:6.2f}s (process: wall {m.wall_s:.1f}s, cpu {m.cpu_s:.1f}s)")
    print(f"search pass 1 (once):             {pass1:6.2f}s")
    print(f"merge's pass 2 (merge - pass 1):  {pass2:6.2f}s")
    print(f"search, per evaluation (median of {len(per_eval)}, {len(rows['rates_tried'])} rate pairs): "
          f"{med:.2f}s = {rows['ratio_to_pass2']:.2f}x pass 2, {rows['ratio_to_merge']:.2f}x a whole merge "
          f"(range {min(per_eval):.2f}-{max(per_eval):.2f}s; search process: wall {s.wall_s:.1f}s, cpu {s.cpu_s:.1f}s)")
    save_result("bench_search.json", {"shape": shape.__dict__, "params": shape.numel(), "input_bytes": input_bytes(paths),
                                      "cpus": os.cpu_count(), "code": code_version(), "evals": args.evals, **rows,
                                      "load_average": os.getloadavg()})
    shutil.rmtree(found, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
