"""Same bytes as another commit? Every example config x input dtype x unit size x thread count,
merged by the live tree and by a snapshot of REV (`common.snapshot`); prints the cases whose
weights or JSON files differ, and checks that each version's weights do not depend on the unit
size or the thread count. Run it before landing a change that should not change any output (a
kernel rewrite, a refactor).

    python benchmarks/compare_outputs.py HEAD~3        # ~4 min on 2 cores (2 x 138 small merges)
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import DATA_DIR, REPO, check_snapshot_import, folder_digest, ours_env, snapshot  # noqa: E402

WORK = os.path.join(DATA_DIR, "compare_outputs")
UNITS = (None, 1 << 20)  # the default, and small enough to split every large tensor
DTYPES = ("bfloat16", "float32")


def cases() -> list[tuple[str, str, int | None, str]]:
    out = []
    for dtype in DTYPES:
        for path in sorted(glob.glob(os.path.join(REPO, "examples", "*.yml"))):
            for unit in UNITS:
                for sched in ("threads:2", "threads:1") if unit else ("threads:2",):
                    out.append((dtype, path, unit, sched))
    return out


def worker(label: str, result_json: str) -> None:
    """Merge every case with whichever dppa_stream this process imports; write file hashes."""
    import torch

    from dppa_stream.config import parse_config
    from dppa_stream.pipeline import MergeOptions, merge
    from dppa_stream.synthetic import LlamaShape, write_llama_set

    res = {}
    for dtype, path, unit, sched in cases():
        models = os.path.join(WORK, "models", dtype)
        if not os.path.isdir(os.path.join(models, "ft2")):
            write_llama_set(models, LlamaShape(hidden=256, intermediate=1024, layers=3, vocab=4096), finetunes=2,
                            dtype=getattr(torch, dtype))
        case = f"{dtype}-{os.path.basename(path)[:-4]}-{unit or 'default'}-{sched}"
        out = os.path.join(WORK, "out", label, case)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(path, encoding="utf-8") as f:
            text = f.read().replace("./models/", models + "/")
        try:
            merge(parse_config(text, path), out, MergeOptions(quiet=True, overwrite=True, unit_bytes=unit,
                                                              scheduler=sched, seed=3))
        except Exception as e:  # noqa: BLE001 - recorded and compared like an output
            res[case] = f"error: {type(e).__name__}: {e}"
            continue
        res[case] = {f: h for f, h in folder_digest(out).items() if f.endswith((".safetensors", ".json"))}
    with open(result_json, "w") as f:
        json.dump(res, f, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the commit to compare the live tree with")
    ap.add_argument("--worker", nargs=2, metavar=("LABEL", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    snap = snapshot(args.rev)
    check_snapshot_import(snap)  # the snapshot, not the editable install, is what its runs import
    os.makedirs(WORK, exist_ok=True)
    results = {}
    for label, env in (("rev", ours_env(snap)), ("live", None)):
        path = os.path.join(WORK, f"{label}.json")
        print(f"merging {len(cases())} cases with {'the snapshot of ' + args.rev if env else 'the live tree'} ...",
              flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), args.rev, "--worker", label, path], env=env,
                       check=True, cwd=WORK)
        with open(path) as f:
            results[label] = json.load(f)
    rev, live = results["rev"], results["live"]
    differ = sorted(k for k in live if live[k] != rev.get(k))
    for label, res in results.items():
        groups = collections.defaultdict(set)
        for case, files in res.items():
            weights = {f: h for f, h in files.items() if f.endswith(".safetensors")} if isinstance(files, dict) else files
            groups[case.rsplit("-", 2)[0]].add(json.dumps(weights, sort_keys=True))
        varying = sorted(k for k, g in groups.items() if len(g) > 1)
        print(f"{label}: weights the same for every unit size and thread count in {len(groups) - len(varying)} "
              f"of {len(groups)} configs" + (f"; differ: {', '.join(varying)}" if varying else ""))
    errors = [k for k, v in live.items() if isinstance(v, str)]
    print(f"live vs {args.rev} ({snap['sha'][:7]}): {len(live) - len(differ)} of {len(live)} cases identical"
          + (f"; differ: {', '.join(differ)}" if differ else "") + (f"; {len(errors)} errors" if errors else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
