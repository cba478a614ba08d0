"""The `fin-tasks` command: one verb per pipeline stage, as named in dvc.yaml."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fin_tasks.config import load_params
from fin_tasks.errors import ConfigError, DataError

log = logging.getLogger("fin_tasks")


def _prepare(args: argparse.Namespace) -> None:
    from fin_tasks.prepare import prepare_task

    params = load_params(args.params)
    names = args.task or list(params.tasks)
    unknown = [name for name in names if name not in params.tasks]
    if unknown:
        raise ConfigError(f"{args.params}: unknown task(s) {', '.join(unknown)}; "
                          f"defined: {', '.join(params.tasks)}")
    for name in names:
        out = Path(args.out_dir) / "prepare" / name
        manifest = prepare_task(name, params.tasks[name], params.prepare, out)
        counts = ", ".join(f"{split} {info['rows']}" for split, info in manifest["splits"].items())
        print(f"prepare {name}: {counts} -> {out}")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="fin-tasks", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)
    prepare = verbs.add_parser("prepare", help="validate raw data into prepared splits")
    prepare.add_argument("--params", default="params.yaml", help="params file (params.yaml)")
    prepare.add_argument("--task", action="append", help="task name (repeatable; default all)")
    prepare.add_argument("--out-dir", default="outputs", help="root of stage outputs")
    prepare.set_defaults(run=_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fin-tasks` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (DataError, ConfigError) as error:
        print(f"fin-tasks {args.verb}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
