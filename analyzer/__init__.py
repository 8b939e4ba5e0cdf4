"""The analyzer server: sessions, streaming, models and rules (see docs/ for the contracts)."""
