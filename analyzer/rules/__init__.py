"""Per-session rule engine: policies (policy.py) and temporal incident rules (engine.py)."""
