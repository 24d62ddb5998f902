"""Start-up of the CLI as a user sees it: seconds from launch to the first progress output, to the first sampling
step bar, and to exit, for the README's main command on the embedded tiny model; `--help` and `inspect` too.

Machines are noisy, so a figure alone means little: give `--baseline-tree DIR` (a `git worktree` of an earlier
commit) and the two trees are run alternately in the same session, each after one warm-up run, and the result is
reported as ratios (baseline / this tree). Results go to benchmarks/results/startup.json.

    git worktree add /tmp/base <commit> && python benchmarks/startup.py --baseline-tree /tmp/base --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "startup.json"
MAIN_COMMAND = ["generate", "1girl, solo, smile"]  # the README's main command (1024x1024, card defaults)
LOAD_MARK = "loading 1/4"  # this tree's first load line
STEP_MARK = "Stage C (prior)"  # the first step bar, in every version


def timed_run(tree: Path, args: list[str], env: dict[str, str]) -> dict[str, float | None]:
    """Run `python -m cascade ARGS` in `tree`; seconds to the first output byte, load line, step bar and exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cascade", *args], cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    marks: dict[str, float | None] = {"first_output": None, "first_load_line": None, "first_step_bar": None}
    seen = []

    def watch() -> None:
        while char := proc.stderr.read(1):
            now = time.perf_counter() - t0
            seen.append(char)
            if marks["first_output"] is None and not char.isspace():
                marks["first_output"] = now
            if marks["first_load_line"] is None and seen[-1] == "." and LOAD_MARK in "".join(seen[-200:]):
                marks["first_load_line"] = now
            if marks["first_step_bar"] is None and char == "%" and STEP_MARK in "".join(seen[-200:]):
                marks["first_step_bar"] = now

    reader = threading.Thread(target=watch)
    reader.start()
    proc.stdout.read()
    proc.wait()
    reader.join()
    marks["exit"] = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {' '.join(args)} exited {proc.returncode}: {''.join(seen)[-2000:]}")
    return marks


def first_progress(marks: dict[str, float | None]) -> float:
    """The first line that says what is happening: the load line where the tree prints one, else the step bar."""
    return marks["first_load_line"] if marks["first_load_line"] is not None else marks["first_step_bar"]


def measure(tree: Path, runs: int, env: dict[str, str], out_dir: Path) -> dict:
    tiny_prior = next((Path(env["CASCADE_CACHE_DIR"])).glob("tiny-v*/tiny_cascade_stage_c.safetensors"), None)
    results = {"generate": [], "help": [], "inspect": []}
    for i in range(runs):
        marks = timed_run(tree, [*MAIN_COMMAND, "--out", str(out_dir / f"{tree.name}-{i}.png")], env)
        marks["first_progress"] = first_progress(marks)
        results["generate"].append(marks)
        results["help"].append(timed_run(tree, ["--help"], env)["exit"])
        if tiny_prior is not None:
            results["inspect"].append(timed_run(tree, ["inspect", str(tiny_prior)], env)["exit"])
    return results


def median(values: list[float]) -> float:
    return statistics.median(v for v in values if v is not None)


def summary(results: dict) -> dict[str, float]:
    gen = results["generate"]
    out = {key: median([m[key] for m in gen]) for key in ("first_output", "first_progress", "first_step_bar", "exit")}
    out["help"] = median(results["help"])
    if results["inspect"]:
        out["inspect"] = median(results["inspect"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-tree", type=Path, help="a worktree of the commit to compare against")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = {**os.environ, "CASCADE_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
        trees = {"this": ROOT}
        if args.baseline_tree:
            trees["baseline"] = args.baseline_tree.resolve()
        for name, tree in trees.items():  # warm-up: builds the tiny model and fills the page cache
            timed_run(tree, [*MAIN_COMMAND, "--out", str(tmp_path / f"warm-{name}.png")], env)
        raw = {name: {"generate": [], "help": [], "inspect": []} for name in trees}
        for _ in range(args.runs):  # alternate, so both trees see the same machine load
            for name, tree in trees.items():
                one = measure(tree, 1, env, tmp_path)
                for key in raw[name]:
                    raw[name][key] += one[key]
    report = {"command": "python -m cascade " + " ".join(f'"{a}"' if " " in a else a for a in MAIN_COMMAND),
              "runs": args.runs, "cpus": os.cpu_count(), "medians_s": {n: summary(r) for n, r in raw.items()},
              "raw": raw}
    if "baseline" in raw:
        base, this = report["medians_s"]["baseline"], report["medians_s"]["this"]
        report["baseline_over_this"] = {k: round(base[k] / this[k], 2) for k in this if k in base and this[k]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "raw"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
