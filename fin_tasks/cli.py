"""The `fin-tasks` command: one verb per pipeline stage, as named in dvc.yaml."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fin_tasks.config import load_params
from fin_tasks.layout import Layout
from fin_tasks.errors import ConfigError, DataError, ModelError, OutputError
from fin_tasks.events import EXIT_OUT_OF_MEMORY, emit, is_out_of_memory

if TYPE_CHECKING:  # resolved lazily, so that stages that read no run do not depend on them
    from fin_tasks.runs import MergeInputs, RunInputs

log = logging.getLogger("fin_tasks")


def _corpus(args: argparse.Namespace) -> None:
    from fin_tasks.corpus import build_corpus

    params, layout = load_params(args.params), Layout(Path(args.out_dir))
    for name in _selected(args.corpus, params.corpus, args.params, "corpus"):
        manifest = build_corpus(name, params.corpus[name], layout.corpus(name))
        print(f"corpus {name}: {manifest['documents']} documents, {manifest['chunks']} chunks, "
              f"dropped {manifest['dropped'] or 'nothing'} -> {layout.corpus(name)}")


def _questions(args: argparse.Namespace) -> None:
    from fin_tasks.questions import build_questions

    params, layout = load_params(args.params), Layout(Path(args.out_dir))
    for name in _selected(args.questions, params.questions, args.params, "question set"):
        config = params.questions[name]
        manifest = build_questions(name, config, layout.corpus(config.corpus),
                                   layout.questions(name))
        print(f"questions {name}: {manifest['built']} ({manifest['numeric']} numeric, "
              f"{manifest['non_numeric']} term), splits {manifest['splits']} "
              f"-> {layout.questions(name)}")


def _prepare(args: argparse.Namespace) -> None:
    from fin_tasks.prepare import prepare_task

    params, layout = load_params(args.params), Layout(Path(args.out_dir))
    for name in _selected(args.task, params.tasks, args.params, "task"):
        out = layout.prepared(name)
        manifest = prepare_task(name, params.tasks[name], params.prepare, out)
        counts = ", ".join(f"{split} {info['rows']}" for split, info in manifest["splits"].items())
        print(f"prepare {name}: {counts} -> {out}")


def _base(args: argparse.Namespace) -> None:
    from fin_tasks.base import build_base

    params, layout = load_params(args.params), Layout(Path(args.out_dir))
    for name in _selected(args.model, params.models, args.params, "model"):
        build_base(name, params.models[name], layout.root / "prepare", layout.base(name),
                   tuple(params.tasks))
        print(f"base {name} -> {layout.base(name)}")


def _runs(args: argparse.Namespace) -> Iterator[tuple[RunInputs, Layout]]:
    """The selected runs, their names resolved once here, with the output layout."""
    from fin_tasks.runs import resolve_run

    params, layout = load_params(args.params), Layout(Path(args.out_dir))
    for name in _selected(args.run, params.train.runs, args.params, "run"):
        yield resolve_run(params, name), layout


def _train(args: argparse.Namespace) -> None:
    for run, layout in _runs(args):
        name, spec = run.name, run.entry
        if run.model.model_kind.baseline:  # no torch to import
            from fin_tasks.baselines import train_baseline

            metrics = train_baseline(run, layout.prepared(spec.task), layout.trained(name),
                                     layout.plots("train", name))
        else:
            from fin_tasks.checkpoints import STORE_ENV
            from fin_tasks.train import train

            metrics = train(run, layout.prepared(spec.task), layout.base(spec.model),
                            layout.trained(name), checkpoint_root=args.checkpoints,
                            plots_dir=layout.plots("train", name),
                            checkpoint_store=os.environ.get(STORE_ENV) or None)
        speed = f", {metrics['tokens_per_s']:.0f} tokens/s" if metrics["tokens_per_s"] else ""
        print(f"train {name}: {metrics['steps']} steps{speed}, best valid "
              f"{metrics['best_valid']} -> {layout.trained(name)}")


def _merge(args: argparse.Namespace) -> None:
    from fin_tasks.merge import merge_adapters
    from fin_tasks.runs import resolve_merge

    params, layout = load_params(args.params), Layout(Path(args.out_dir))
    for name in _selected(args.merge, params.merge, args.params, "merge"):
        inputs = resolve_merge(params, name)
        merge = inputs.config
        record = merge_adapters(inputs, layout.base(inputs.model_name), layout.root / "train",
                                layout.prepared(merge.evaluate_on), layout.merged(name))
        check = record["check"]
        print(f"merge {name} ({merge.method}): max logit difference {check['max_abs_diff']:.3g} "
              f"vs unmerged (limit {check['limit']}) -> {layout.merged(name)}")


def _merges(args: argparse.Namespace) -> Iterator[tuple[MergeInputs, Layout]]:
    """Merges named with --merge (predict/evaluate then handle no train run), their names
    resolved once here, with the output layout."""
    if not args.merge:
        return
    from fin_tasks.runs import resolve_merge

    params, layout = load_params(args.params), Layout(Path(args.out_dir))
    for name in _selected(args.merge, params.merge, args.params, "merge"):
        yield resolve_merge(params, name), layout


def _ensemble(args: argparse.Namespace) -> None:
    from fin_tasks.ensemble import build_ensemble
    from fin_tasks.tasks import task_from_config

    params, layout = load_params(args.params), Layout(Path(args.out_dir))
    for name in _selected(args.ensemble, params.ensemble, args.params, "ensemble"):
        config = params.ensemble[name]
        record = build_ensemble(name, config, task_from_config(config.task,
                                                               params.tasks[config.task]),
                                layout.prepared(config.task), layout.root / "predict",
                                layout.ensembled(name))
        print(f"ensemble {name}: {config.method} of {', '.join(record['members'])} (weights "
              f"{record['weights']}) -> {layout.ensembled(name)}")


def _predict(args: argparse.Namespace) -> None:
    for merge, layout in _merges(args):
        from fin_tasks.predict import predict_merge

        name = merge.name
        info = predict_merge(merge, layout.prepared(merge.config.evaluate_on),
                             layout.base(merge.model_name), layout.root / "train",
                             layout.merged(name), layout.predictions(name))
        print(f"predict {name}: {', '.join(info['variants'])} -> {layout.predictions(name)}")
    if args.merge and not args.run:
        return
    for run, layout in _runs(args):
        name, spec = run.name, run.entry
        if run.model.model_kind.baseline:  # no torch to import
            from fin_tasks.predictions import predict_baseline

            info = predict_baseline(run, layout.prepared(spec.task), layout.trained(name),
                                    layout.predictions(name))
        else:
            from fin_tasks.predict import predict_run

            info = predict_run(run, layout.prepared(spec.task), layout.base(spec.model),
                               layout.trained(name), layout.predictions(name))
        print(f"predict {name}: {', '.join(info['variants'])} -> {layout.predictions(name)}")


def _evaluate(args: argparse.Namespace) -> None:
    from fin_tasks.evaluate import evaluate_ensemble, evaluate_merge, evaluate_run
    from fin_tasks.tasks import task_from_config

    if args.ensemble:
        params, layout = load_params(args.params), Layout(Path(args.out_dir))
        for name in _selected(args.ensemble, params.ensemble, args.params, "ensemble"):
            task_name = params.ensemble[name].task
            result = evaluate_ensemble(
                name, task_from_config(task_name, params.tasks[task_name]), params.evaluate,
                layout.prepared(task_name), layout.ensembled(name), layout.evaluation(name),
                plots_dir=layout.plots("evaluate", name))
            _print_evaluation(name, result, layout.evaluation(name))

    for merge, layout in _merges(args):
        name = merge.name
        result = evaluate_merge(merge, layout.prepared(merge.config.evaluate_on),
                                layout.merged(name), layout.predictions(name),
                                layout.evaluation(name), plots_dir=layout.plots("evaluate", name))
        _print_evaluation(name, result, layout.evaluation(name))
    if (args.merge or args.ensemble) and not args.run:
        return
    for run, layout in _runs(args):
        name = run.name
        result = evaluate_run(run, layout.prepared(run.entry.task), layout.predictions(name),
                              layout.evaluation(name), plots_dir=layout.plots("evaluate", name))
        _print_evaluation(name, result, layout.evaluation(name))


def _print_evaluation(name: str, result: dict, out: Path) -> None:
    key = result["ranking_metric"]
    summary = ", ".join(f"{variant}/{split} {key} {m[key]:.4f}"
                        for variant, splits in result["metrics"].items()
                        for split, m in splits.items())
    print(f"evaluate {name}: {summary or 'no labeled split'} -> {out}")


def _submit(args: argparse.Namespace) -> None:
    from fin_tasks.submit import SubmissionError, submit_task

    params, layout = load_params(args.params), Layout(Path(args.out_dir))
    for name in _selected(args.task, params.submit.tasks, args.params, "submit task"):
        try:
            report = submit_task(name, params, layout.root, layout.submission(name))
        except SubmissionError as error:
            raise ConfigError(f"submit {name}: {error}") from None
        print(f"submit {name}: {report['run']} ({report['variant']}), {report['rows']} rows, "
              f"validated -> {layout.submission(name)}")


def _report(args: argparse.Namespace) -> None:
    from fin_tasks.artifacts import write_text
    from fin_tasks.report import build_report, costs_summary

    params, layout = load_params(args.params), Layout(Path(args.out_dir))
    rows = build_report(params, layout.root, layout.report())
    write_text(layout.root / "costs" / "summary.md", costs_summary(params, layout.root))
    print(f"report: {len(rows)} leaderboard rows -> {layout.report() / 'leaderboard.md'}; "
          f"this machine's timings -> {layout.root / 'costs' / 'summary.md'}")


def _selected(names: list[str] | None, defined: dict, params: str, what: str) -> list[str]:
    """The entries named on the command line (all when none), each checked to exist."""
    unknown = [name for name in names or [] if name not in defined]
    if unknown:
        raise ConfigError(f"{params}: unknown {what}(s) {', '.join(unknown)}; "
                          f"defined: {', '.join(defined)}")
    return names or list(defined)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="fin-tasks", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)
    corpus = verbs.add_parser("corpus", help="clean, deduplicate and chunk a text corpus")
    corpus.add_argument("--corpus", action="append", help="corpus name (repeatable; default all)")
    questions = verbs.add_parser("questions",
                                 help="build numeric multiple-choice questions from a corpus")
    questions.add_argument("--questions", action="append",
                           help="question set name (repeatable; default all)")
    prepare = verbs.add_parser("prepare", help="validate raw data into prepared splits")
    prepare.add_argument("--params", default="params.yaml", help="params file")
    prepare.add_argument("--task", action="append", help="task name (repeatable; default all)")
    prepare.add_argument("--out-dir", default="outputs", help="root of stage outputs")
    prepare.set_defaults(handler=_prepare)
    base = verbs.add_parser("base", help="build a tiny model, convert a GGUF one, or record a "
                                         "hub/local one")
    base.add_argument("--model", action="append", help="model name (repeatable; default all)")
    train = verbs.add_parser("train", help="fine-tune one model on one task (LoRA / QLoRA)")
    train.add_argument("--run", action="append", help="run name (repeatable; default all)")
    train.add_argument("--checkpoints", default=".checkpoints",
                       help="root of resumable checkpoints (kept until a run completes); "
                       "$FIN_TASKS_CHECKPOINT_STORE, a shared folder or fsspec URL, also "
                       "keeps a copy for another machine to resume from")
    predict = verbs.add_parser("predict", help="predict valid/test with each model variant")
    evaluate = verbs.add_parser("evaluate", help="score predictions as the organizers do")
    merge = verbs.add_parser("merge", help="merge adapters into their base, checked")
    merge.add_argument("--merge", action="append", help="merge name (repeatable; default all)")
    for sub in (predict, evaluate):
        sub.add_argument("--run", action="append", help="run name (repeatable; default all "
                         "runs unless --merge is given)")
        sub.add_argument("--merge", action="append",
                         help="a merge's comparison: base, base + each adapter, merged")
    evaluate.add_argument("--ensemble", action="append",
                          help="an ensemble's predictions (out-of-fold on valid for a stack)")
    ensemble = verbs.add_parser("ensemble", help="combine runs' class probabilities (mean, or "
                                                 "a stacker fit on valid)")
    ensemble.add_argument("--ensemble", action="append",
                          help="ensemble name (repeatable; default all)")
    submit = verbs.add_parser("submit", help="build and validate a submission bundle per task")
    submit.add_argument("--task", action="append", help="task name (repeatable; default all)")
    report = verbs.add_parser("report", help="write the leaderboard (Markdown and CSV)")
    for sub, handler in ((corpus, _corpus), (questions, _questions), (base, _base),
                         (train, _train), (merge, _merge), (predict, _predict),
                         (ensemble, _ensemble),
                         (evaluate, _evaluate), (submit, _submit), (report, _report)):
        sub.add_argument("--params", default="params.yaml", help="params file")
        sub.add_argument("--out-dir", default="outputs", help="root of stage outputs")
        sub.set_defaults(handler=handler)
    for name, sub in verbs.choices.items():
        sub.formatter_class = argparse.ArgumentDefaultsHelpFormatter
        sub.epilog = "example: " + EXAMPLES[name]
    return parser


EXAMPLES = {
    "corpus": "fin-tasks corpus --corpus textbook",
    "questions": "fin-tasks questions --questions numeric_mcq",
    "prepare": "fin-tasks prepare --task finarg_ecc --params configs/cpu-llms.yaml "
               "--out-dir outputs-cpu",
    "base": "fin-tasks base --model smollm2",
    "train": "fin-tasks train --run smollm2-finarg_ecc",
    "merge": "fin-tasks merge --merge numllm",
    "predict": "fin-tasks predict --run smollm2-finarg_ecc   (or --merge numllm)",
    "evaluate": "fin-tasks evaluate --run smollm2-finarg_ecc   (then: dvc metrics show)",
    "ensemble": "fin-tasks ensemble --ensemble finarg_ecc-stack   (then: fin-tasks evaluate "
                "--ensemble finarg_ecc-stack)",
    "submit": "fin-tasks submit --task finarg_ecc",
    "report": "fin-tasks report   (writes outputs/report/leaderboard.md)",
}


def _data_parallel_relaunch(argv: list[str]) -> int | None:
    """`train` with FIN_TASKS_TRAIN_PROCESSES=N (N > 1) runs as N data-parallel processes
    (one per GPU) under torch.distributed.run, as `accelerate launch` would; the dvc.yaml
    command stays the same. Returns the exit code, or None when not asked for."""
    processes = int(os.environ.get("FIN_TASKS_TRAIN_PROCESSES", "1"))
    if processes <= 1 or "WORLD_SIZE" in os.environ or not argv or argv[0] != "train":
        return None
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "fin_tasks.cli", *argv]
    return subprocess.run(command).returncode


def _quiet_libraries() -> None:
    """Drop what a user cannot act on: transformers' and peft's deprecation notices (about
    calls inside fin-tasks) and per-tensor loading progress bars. Their loggers still report
    warnings and errors."""
    import warnings

    for module in ("transformers", "peft", "torch.utils.checkpoint"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    # read when transformers is first imported (later, by the stage that needs it)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fin-tasks` console script."""
    code = _data_parallel_relaunch(sys.argv[1:] if argv is None else argv)
    if code is not None:
        return code
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    if getattr(args, "out_dir", None):  # this machine's timings, beside the outputs
        from fin_tasks import costs

        costs.write_to(Path(args.out_dir) / "costs")
    try:
        args.handler(args)
    except (DataError, ConfigError, ModelError, OutputError) as error:
        print(f"fin-tasks {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fin-tasks {args.verb}: interrupted; nothing was half-written (outputs appear "
              "only when complete; a training resumes from its last checkpoint)",
              file=sys.stderr)
        return 130
    except Exception as error:  # out of memory: a status the orchestrator retries on
        if not is_out_of_memory(error):
            raise
        print(f"fin-tasks {args.verb}: error: out of memory: {error}", file=sys.stderr)
        emit("out_of_memory", verb=args.verb, error=str(error)[:500])
        return EXIT_OUT_OF_MEMORY
    return 0


if __name__ == "__main__":
    sys.exit(main())
