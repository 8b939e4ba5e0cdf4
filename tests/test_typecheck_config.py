"""mypy's targets ([tool.mypy] in pyproject.toml) cover every bench script: they are listed by module name."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_bench_script_is_type_checked() -> None:
    mypy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert "bench" in mypy["mypy_path"]
    scripts = {p.stem for p in (REPO / "bench").glob("*.py")}
    assert scripts == set(mypy["modules"]), "list bench/*.py in [tool.mypy] modules"
