"""Run several mergekit merges in one process (torch and mergekit import once): executed by
tests/test_mergekit_parity.py with the mergekit virtualenv's python, never imported by the tests.

    python tests/mergekit_driver.py JOBS.json RESULTS.json

JOBS.json: [{"config": PATH, "out": DIR, "seed": INT, "lora_merge_cache": DIR (optional)}, ...]. Each job runs
`mergekit.merge.run_merge` (what `mergekit-yaml CONFIG OUT --random-seed SEED --no-copy-tokenizer`
does) and its outcome is written to RESULTS.json as {"out": ..., "ok": bool, "error": str,
"seconds": float}; one failing job does not stop the others. The exit status is 0 when the
driver itself ran, whatever the jobs did (the test reads the results), 2 when mergekit is broken.
"""

import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv):
    jobs_path, results_path = argv
    try:
        import importlib.metadata

        import torch
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
        version = importlib.metadata.version("mergekit")
    except Exception as e:
        with open(results_path, "w") as f:
            json.dump({"broken": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, f)
        return 2
    torch.set_num_threads(1)
    results = []
    with open(jobs_path) as f:
        jobs = json.load(f)
    for job in jobs:
        t0 = time.perf_counter()
        res = {"out": job["out"], "config": job["config"], "ok": False, "error": ""}
        try:
            with open(job["config"], encoding="utf-8") as f:
                source = f.read()
            config = MergeConfiguration.model_validate(yaml.safe_load(source))
            options = MergeOptions(copy_tokenizer=False, quiet=True, random_seed=job.get("seed"),
                                   write_model_card=False, lora_merge_cache=job.get("lora_merge_cache"))
            run_merge(config, job["out"], options=options, config_source=source)
            res["ok"] = True
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"[-2000:]
        res["seconds"] = round(time.perf_counter() - t0, 3)
        results.append(res)
    with open(results_path, "w") as f:
        json.dump({"mergekit": version, "torch": torch.__version__, "jobs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
