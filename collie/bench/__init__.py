"""``collie bench``: a grid of configurations, each trained for a few steps in its own processes, reported as
a table, a CSV and a plot of tokens/s per GPU and peak memory."""
from collie.bench.grid import BenchGrid, BenchRun, load_grid
from collie.bench.report import write_report
from collie.bench.runner import run_one, summarise

__all__ = ["BenchGrid", "BenchRun", "load_grid", "run_one", "summarise", "write_report"]
