"""A dated results page from one run's outputs: the command and commit that produced it, the
machine (CPU model, flags that decide the compute dtype, cores, load), each verb's time (from
the run's log), each training's cost and resolved numerics, and the leaderboard the run's
`report` stage wrote. Nothing is typed in by hand.

    bash scripts/run-config.sh configs/cpu-task1.yaml 2>&1 | tee run.log
    python bench/results_page.py outputs-cpu-task1 --config configs/cpu-task1.yaml --log run.log
        [--page docs/results/2026-12-06-cpu-task1.md] [--note "..."]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
from pathlib import Path

from common import ROOT

VERB_TIME = re.compile(r"^run-config: (.+) took (\d+) s$")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine() -> str:
    """CPU model, the flags that decide bf16 compute, cores, memory and load right now."""
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown CPU")
    flags = set(info.split())
    memory = next((int(line.split()[1]) // 2**20 for line in
                   Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, {memory} GiB; flags: "
            f"{', '.join(f for f in FLAGS if f in flags) or 'none of ' + ', '.join(FLAGS)}; "
            f"load average (1, 5, 15 min) when this page was written: {load}")


def commit() -> str:
    """The commit checked out, marked when the tree has changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head + (" (with uncommitted changes)" if dirty else "")


def verb_times(log: Path | None) -> list[str]:
    """The run log's per-verb durations as a table."""
    if log is None:
        return []
    times = [m.groups() for m in map(VERB_TIME.match, log.read_text().splitlines()) if m]
    if not times:
        return []
    return ["## Time per verb (the run's log)", "", "| verb | seconds |", "|---|---|",
            *[f"| {verb} | {seconds} |" for verb, seconds in times], ""]


def trainings(out: Path) -> list[str]:
    """Each training's cost (costs/train/<run>.json, this machine's record) and the numerics
    it ran with (train_config.json, metrics.json)."""
    lines = ["## Training", "", "| run | steps | examples | wall s | tokens/s | peak MiB | "
             "compute dtype | head |", "|---|---|---|---|---|---|---|---|"]
    for folder in sorted((out / "train").iterdir()):
        metrics = json.loads((folder / "metrics.json").read_text())
        cost = out / "costs" / "train" / f"{folder.name}.json"
        metrics |= json.loads(cost.read_text()) if cost.exists() else {}
        record = json.loads((folder / "train_config.json").read_text())
        quant = record.get("quantization") or {}
        head = (record.get("run") or {}).get("head")
        peak = metrics.get("peak_memory_bytes")
        lines.append(f"| {folder.name} | {metrics.get('steps')} | "
                     f"{metrics.get('train_examples', '-')} | {metrics.get('wall_s')} | "
                     f"{metrics.get('tokens_per_s') or '-'} | "
                     f"{round(peak / 2**20) if peak else '-'} | "
                     f"{quant.get('compute_dtype') or _stored(record)} | "
                     f"{head['body'] if head else '-'} |")
    return lines + [""]


def _stored(record: dict) -> str:
    """A model that is not quantized computes in the dtype it is stored in."""
    return f"{(record.get('model') or {}).get('dtype', '-')} (not quantized)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--config", required=True)
    parser.add_argument("--log", type=Path, help="the run's log (per-verb times)")
    parser.add_argument("--page", type=Path, help="default docs/results/<date>-<config>.md")
    parser.add_argument("--note", default="", help="a line on the conditions of the run")
    parser.add_argument("--commit", help="the commit the run used, when the checkout has "
                        "moved on since (default: the checkout's)")
    parser.add_argument("--command", help="the command that made the outputs (default: "
                        "`bash scripts/run-config.sh CONFIG`)")
    args = parser.parse_args()
    today = datetime.date.today().isoformat()
    name = Path(args.config).stem
    page = args.page or ROOT / "docs" / "results" / f"{today}-{name}.md"
    board = (args.out_dir / "report" / "leaderboard.md").read_text(encoding="utf-8")
    board = board.replace("# Leaderboard", "## Leaderboard (the run's `report` stage)", 1)
    lines = [f"# {name}: results of {today}", "",
             f"- command: `{args.command or 'bash scripts/run-config.sh ' + args.config}`",
             f"- page: `python bench/results_page.py {args.out_dir} --config {args.config}"
             f"{' --log LOG' if args.log else ''}"
             f"{' --command ' + repr(args.command) if args.command else ''}"
             f"{' --commit ' + args.commit if args.commit else ''}`",
             f"- commit: {args.commit or commit()}", f"- machine: {machine()}",
             *([f"- conditions: {args.note}"] if args.note else []), "",
             *verb_times(args.log), *trainings(args.out_dir), board]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines), encoding="utf-8")
    print(f"results page -> {page}")


if __name__ == "__main__":
    main()
