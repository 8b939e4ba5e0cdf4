"""REST routes of the analyzer, one module per area."""
