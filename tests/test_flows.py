"""The Prefect flow runs the library's stages on the demo data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server/database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def test_pipeline_flow_prepares_the_demo_tasks(prefect_harness, tmp_path: Path) -> None:
    from flows.pipeline import pipeline

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for config in raw["tasks"].values():
        config["data"] = str(ROOT / config["data"])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    manifests = pipeline(str(params), ["finarg_ecc", "fineval"], str(tmp_path / "outputs"))
    assert set(manifests) == {"finarg_ecc", "fineval"}
    assert (tmp_path / "outputs/prepare/fineval/test.jsonl").exists()
    assert manifests["finarg_ecc"]["splits"]["test"]["rows"] == 16
