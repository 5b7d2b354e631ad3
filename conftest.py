"""Makes the flat modules at the repo root importable from tests/ under plain `pytest`."""
