"""Writes docs/alert.schema.json from the canonical pydantic model.

Run from anywhere with the package installed:  python docs/gen_schema.py
Do not edit alert.schema.json by hand; change proctor/contracts/alerts.py (or add a rule to the catalog,
analyzer/rules/catalog.py, which registers its event type) and rerun.
"""

from __future__ import annotations

import json
from pathlib import Path

import livekit_proctor.analyzer.rules.catalog  # noqa: F401  # registers the catalog's event types
from livekit_proctor.contracts.alerts import alert_json_schema

OUT = Path(__file__).resolve().parent / "alert.schema.json"


def main() -> None:
    OUT.write_text(json.dumps(alert_json_schema(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
