"""Test set-up: the flat modules at the repo root import from tests/ under plain `pytest`, and
torch runs one thread per process. CI has 2 cores; torch's default of one thread per core
turns into busy-waiting whenever a second process (a CLI run, the machine's other work) shares
them, which made single training steps up to 100x slower here. Set before torch is imported."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
