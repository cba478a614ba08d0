"""Params: every shipped file loads, unknown keys are named, dvc.yaml's keys exist."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from fin_tasks.config import load_params, parse_params
from fin_tasks.errors import ConfigError
from fin_tasks.tasks import task_from_config

from conftest import ROOT

SHIPPED = sorted([ROOT / "params.yaml", *(ROOT / "configs").glob("*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_params_file_loads(path: Path) -> None:
    params = load_params(path)
    assert params.tasks
    for name, config in params.tasks.items():
        assert task_from_config(name, config).name == name


def test_unknown_key_is_named_with_the_allowed_keys() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["prepare"]["valid_fractoin"] = 0.2
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    assert "unknown key 'prepare.valid_fractoin'" in str(error.value)
    assert "valid_fraction" in str(error.value) and "seed" in str(error.value)


def test_unknown_key_inside_a_task_is_named() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tasks"]["sentiment"]["columns"]["labl"] = "x"
    with pytest.raises(ConfigError, match=r"tasks\.sentiment\.columns\.labl.*id, label, text"):
        parse_params(raw)


def test_unknown_top_level_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        parse_params({"tasks": {}, "trian": {}})


def test_generic_task_needs_labels_and_instruction() -> None:
    task = {"type": "classification", "data": "x", "splits": {"train": "a.csv"},
            "columns": {"id": "i", "text": "t", "label": "l"}, "instruction": "Classify."}
    with pytest.raises(ConfigError, match="needs 'labels'"):
        parse_params({"tasks": {"t": task}})


def test_config_is_frozen() -> None:
    params = load_params(ROOT / "params.yaml")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        params.prepare.seed = 1  # type: ignore[misc]


# stages run by another stage's module (the stage name is the module's otherwise)
STAGE_MODULE = {"predict_merge": "predict", "evaluate_merge": "evaluate",
                "evaluate_ensemble": "evaluate"}


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _lookup(tree: dict, dotted: str) -> object:
    node: object = tree
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"params key '{dotted}' missing"
        node = node[part]
    return node


def _expanded_stages(raw: dict) -> list[tuple[str, dict]]:
    """dvc.yaml stages with foreach expanded over params.yaml, as DVC would expand them."""
    stages = []
    for name, stage in _dvc_stages().items():
        if "foreach" not in stage:
            stages.append((name, stage))
            continue
        items = _lookup(raw, stage["foreach"].strip("${}"))
        for key, item in items.items():
            text = yaml.safe_dump(stage["do"]).replace("${key}", key)
            for field, value in (item or {}).items():
                text = text.replace("${item.%s}" % field, str(value))
            stages.append((f"{name}@{key}", yaml.safe_load(text)))
    return stages


def test_every_param_key_dvc_yaml_names_exists() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    checked = 0
    for name, stage in _expanded_stages(raw):
        for key in stage.get("params", []):
            _lookup(raw, key)
            checked += 1
        assert "${" not in yaml.safe_dump(stage), f"{name}: unresolved template"
    assert checked > 0


def test_every_path_dvc_yaml_names_exists_or_is_an_output() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = _expanded_stages(raw)
    outs = {next(iter(o)) if isinstance(o, dict) else o for _, s in stages
            for kind in ("outs", "metrics", "plots") for o in s.get(kind, [])}
    for name, stage in stages:
        for dep in stage.get("deps", []):
            produced = any(dep == out or out.startswith(dep + "/") for out in outs)
            assert produced or (ROOT / dep).exists(), f"{name}: dependency {dep} missing"


def _module_file(name: str) -> Path | None:
    """The file of a fin_tasks module or package called `name`, if there is one."""
    base = ROOT / name.replace(".", "/")
    for target in (base.with_suffix(".py"), base / "__init__.py"):
        if name.startswith("fin_tasks.") and target.exists():
            return target
    return None


def _imported_modules(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """fin_tasks modules that `path` imports, directly or through each other, in every
    form: `import fin_tasks.a`, `from fin_tasks.a import name`, `from fin_tasks import a`,
    `from fin_tasks.pkg import module`; importing a package's module runs the package's
    `__init__` first."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for end in range(2, len(parts) + 1):  # each enclosing package, then the module
                target = _module_file(".".join(parts[:end]))
                if target is not None and target not in seen:
                    seen.add(target)
                    _imported_modules(target, seen)
    return seen


def _cli_top_level_modules() -> set[str]:
    """fin_tasks modules the CLI imports before dispatching to any stage."""
    tree = ast.parse((ROOT / "fin_tasks/cli.py").read_text())
    return {node.module.replace(".", "/") + ".py" for node in tree.body
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fin_tasks.")}


@pytest.mark.parametrize("stage", sorted(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_each_stage_names_exactly_the_library_modules_it_imports(stage: str) -> None:
    """Not one module too few (an edit would not rerun the stage) nor too many (an edit
    would rerun it for nothing)."""
    definition = _dvc_stages()[stage]
    deps = set()  # a folder stands for every module in it
    for dep in definition.get("do", definition)["deps"]:
        if dep.startswith("fin_tasks/"):
            deps |= ({str(p.relative_to(ROOT)) for p in (ROOT / dep).rglob("*.py")}
                     if (ROOT / dep).is_dir() else {dep})
    module = STAGE_MODULE.get(stage, stage)
    needed = {str(p.relative_to(ROOT)) for p in _imported_modules(ROOT / f"fin_tasks/{module}.py")}
    needed |= {f"fin_tasks/{module}.py", "fin_tasks/cli.py"} | _cli_top_level_modules()
    assert deps == needed, (f"dvc.yaml {stage}: deps lack {sorted(needed - deps)}, "
                            f"list {sorted(deps - needed)} that it never imports")


def test_no_stage_depends_on_the_schedule_section_or_its_module() -> None:
    """Only the flows read `schedule`: editing it, or ScheduleConfig's module, reruns no stage
    (a stage's code deps are its import closure, checked above)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in _expanded_stages(raw):
        assert "fin_tasks/schedule.py" not in stage.get("deps", []), name
        assert not any(key.split(".")[0] == "schedule" for key in stage.get("params", [])), name
    for stage in _dvc_stages():
        module = STAGE_MODULE.get(stage, stage)
        closure = _imported_modules(ROOT / f"fin_tasks/{module}.py")
        closure |= _imported_modules(ROOT / "fin_tasks/cli.py")
        assert ROOT / "fin_tasks/schedule.py" not in closure, stage


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_the_schedule_section_is_validated_where_it_is_read(path: Path) -> None:
    from fin_tasks.schedule import schedule_config

    assert schedule_config(load_params(path)).cron
    raw = yaml.safe_load(path.read_text())
    raw["schedule"] = (raw.get("schedule") or {}) | {"crn": "0 3 * * *"}
    params = parse_params(raw)  # a stage does not read it ...
    with pytest.raises(ConfigError, match=r"unknown key 'schedule\.crn'; allowed keys here: "
                                          r"cron, dispatch_gpu, gpu_resubmits, heartbeat_s, "
                                          r"lost_after_s, push, timezone"):
        schedule_config(params)  # ... the flows do


def test_a_params_key_given_twice_is_refused(tmp_path: Path) -> None:
    text = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("prepare:\n  seed: 13\n", "prepare:\n  seed: 13\n  seed: 14\n"))
    with pytest.raises(ConfigError, match=r"key 'seed' is given twice in one mapping \(line \d+ "
                                          r"and line \d+\)"):
        load_params(path)


def test_labels_listed_twice_and_negative_seeds_are_refused() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tasks"]["sentiment"]["labels"] = ["negative", "neutral", "negative"]
    with pytest.raises(ConfigError, match="lists negative more than once"):
        parse_params(raw)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["prepare"]["seed"] = -1
    with pytest.raises(ConfigError, match=r"'prepare\.seed': Input should be greater than"):
        parse_params(raw)


def test_a_run_override_of_the_wrong_type_is_located_at_the_run() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["runs"]["smollm2-finarg_ecc"]["hyper"] = {"lr": "fast"}
    with pytest.raises(ConfigError, match=r"train\.runs\.smollm2-finarg_ecc\.hyper\.lr: "
                                          r"Input should be a valid number"):
        parse_params(raw)


def test_every_verb_shows_its_defaults_and_an_example(capsys) -> None:
    from fin_tasks.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    for name, sub in verbs.items():
        text = sub.format_help()
        assert "(default: outputs)" in text and f"example: fin-tasks {name}" in text, name


def test_params_yaml_is_written_as_dvc_writes_it_back(tmp_path) -> None:
    """`dvc exp run --set-param` rewrites params.yaml through DVC's own YAML dumper: a file in
    that style changes by exactly the one line that was set."""
    import difflib

    from dvc.utils.serialize import modify_yaml

    copy = tmp_path / "params.yaml"
    copy.write_text((ROOT / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    with modify_yaml(copy) as data:
        data["train"]["runs"]["smollm2-finarg_ecc"]["hyper"]["lr"] = 2.0e-3
    diff = [line for line in difflib.unified_diff(
        (ROOT / "params.yaml").read_text(encoding="utf-8").splitlines(),
        copy.read_text(encoding="utf-8").splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert diff == ["-      hyper: {lr: 1.0e-3, max_length: 256}",
                    "+      hyper: {lr: 0.002, max_length: 256}"]


def test_dvc_yaml_outputs_are_where_the_code_writes_them() -> None:
    """Output paths are written twice, in dvc.yaml and in fin_tasks/layout.py: they agree."""
    from fin_tasks.layout import HEADLINE_DIR, Layout

    layout = Layout()
    where = {
        "corpus": lambda k: {layout.corpus(k)}, "questions": lambda k: {layout.questions(k)},
        "prepare": lambda k: {layout.prepared(k)}, "base": lambda k: {layout.base(k)},
        "train": lambda k: {layout.trained(k), layout.plots("train", k)},
        "predict": lambda k: {layout.predictions(k)}, "merge": lambda k: {layout.merged(k)},
        "predict_merge": lambda k: {layout.predictions(k)},
        "ensemble": lambda k: {layout.ensembled(k)},
        "submit": lambda k: {layout.submission(k)}, "report": lambda k: {layout.report()}}
    for group in ("evaluate", "evaluate_merge", "evaluate_ensemble"):
        where[group] = lambda k: {layout.evaluation(k) / "evaluation.json",
                                  layout.evaluation(k) / HEADLINE_DIR,
                                  layout.plots("evaluate", k)}
    stages = _expanded_stages(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert {name.split("@")[0] for name, _ in stages} == set(where)
    for name, stage in stages:
        group, _, key = name.partition("@")
        declared = {Path(next(iter(o)) if isinstance(o, dict) else o)
                    for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])}
        assert declared == where[group](key), name
