"""Run the benchmark suite and write BENCHMARKS.md, results.json and charts: `python -m benchmarks.run [--help]`."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from . import adapters, infer, kernels, memory, train
from .common import machine, set_threads

ROOT = Path(__file__).resolve().parents[1]
# in the order they run; "kernels" has no default rows (CUDA: benchmarks/gpu.sh names them)
GROUPS = {"train": train, "infer": infer, "memory": memory, "adapters": adapters, "kernels": kernels}


def select(names: list[str] | None) -> dict[str, list[str]]:
    """{group: [row keys]} for `names` (group names or row keys); None: every group's default rows."""
    if not names:
        return {g: list(mod.DEFAULT) for g, mod in GROUPS.items()}
    out = {}
    for name in names:
        if name in GROUPS:
            out.setdefault(name, []).extend(k for k in GROUPS[name].DEFAULT if k not in out.get(name, []))
            continue
        group = next((g for g, mod in GROUPS.items() if name in mod.ROWS), None)
        if group is None and name != "quality":
            raise SystemExit(f"unknown workload {name!r}; groups: {list(GROUPS)} + quality; rows: "
                             f"{[k for mod in GROUPS.values() for k in mod.ROWS]}")
        if group:
            out.setdefault(group, []).append(name)
    return out


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine has used, CPU seconds this process and its children have used)."""
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except OSError:
        busy = own
    return busy, own


def other_load(before: tuple[float, float], seconds: float) -> float:
    """Share of the machine's cores that other processes kept busy since `before` (0: we had it to ourselves)."""
    busy, own = cpu_seconds()
    return max(0.0, (busy - before[0]) - (own - before[1])) / (seconds * (os.cpu_count() or 1))


def run_quality(size: str) -> None:
    """Run benchmarks/quality.py (another script, with its own output: results/quality.json) if it exists."""
    if not (ROOT / "benchmarks" / "quality.py").exists():
        print("benchmarks/quality.py does not exist yet; skipping quality", flush=True)
        return
    cmd = [sys.executable, "-m", "benchmarks.quality"] + (["--quick"] if size != "full" else [])
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run the chosen workloads (a failing row is recorded, the rest still run), write the
    report; returns the results dict."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--size", choices=["full", "quick", "tiny", "gpu"], default="full",
                        help="full: the sizes BENCHMARKS.md reports; quick: real models, small batches; tiny: tests; "
                             "gpu: the CUDA run's sizes (benchmarks/gpu.sh)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="groups (train infer memory adapters quality) or rows")
    parser.add_argument("--quality", action="store_true", help="also run benchmarks/quality.py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md", help="where to write the report")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="JSON and charts")
    parser.add_argument("--update", action="store_true", help="keep earlier rows (results.json) that are not re-run")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from results.json")
    args = parser.parse_args(argv)
    from .report import write

    if args.report:
        write(json.loads((args.results / "results.json").read_text()), args.md, args.results)
        return {}
    if args.list:
        for g, mod in GROUPS.items():
            print(f"{g}: " + " ".join(f"{k}{'' if k in mod.DEFAULT else ' (not default)'}" for k in mod.ROWS))
        return {}
    threads = set_threads()
    chosen = select(args.only)
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "results.json"
    results = json.loads(json_path.read_text()) if args.update and json_path.exists() else {"groups": {}}
    command = "python -m benchmarks.run" + ("" if argv is None and len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:] if argv is None else argv))
    runs = results.get("meta", {}).get("runs", []) if args.update else []  # every run whose rows the file holds
    runs.append({"command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
    results["meta"] = {"machine": machine(), "device": args.device, "size": args.size, "runs": runs}
    start = time.time()
    print(f"{threads} torch threads; running {chosen}", flush=True)
    for group, keys in chosen.items():
        for key in keys:
            t, cpu = time.time(), cpu_seconds()
            try:
                row = GROUPS[group].run_row(key, args.size, args.device)
            except Exception as e:  # noqa: BLE001 (a 20-minute run should not lose every other row to one failure)
                traceback.print_exc()
                row = {"row": key, "error": f"{type(e).__name__}: {e}"}
            # Other jobs on the machine slow every variant alike (interleaving), but widen the spread: say so.
            row["log"] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "seconds": time.time() - t, "other_load": other_load(cpu, time.time() - t)}
            results["groups"].setdefault(group, {})[key] = row
            print(f"[{time.time() - start:6.0f}s] {key} ({time.time() - t:.0f}s, other load {row['log']['other_load']:.0%}): "
                  + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k not in ("quartiles", "log")},
                               ensure_ascii=False), flush=True)
            json_path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")  # progress survives a crash
    if args.quality or (args.only and "quality" in args.only):
        run_quality(args.size)
    runs[-1]["minutes"] = (time.time() - start) / 60
    json_path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    write(results, args.md, args.results)
    print(f"wrote {args.md} and {args.results}/ in {runs[-1]['minutes']:.1f} minutes", flush=True)
    return results


if __name__ == "__main__":
    main()
