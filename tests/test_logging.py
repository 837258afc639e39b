"""Console logs written to a file or a pipe (SLURM): one line per entry, whatever its length, and no progress bar."""
import logging
import os
import re
import subprocess
import sys

from collie.log import LINE_FORMAT, OneLineFormatter, console_handler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) \S")


def test_collie_train_into_a_file_writes_one_line_per_entry(tmp_path):
    out = tmp_path / "slurm.out"
    overrides = ["train.max_steps=3", "train.log_every=1", "train.progress_bar=true",
                 f"train.output_dir={tmp_path}/run",
                 "model.arch={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64}", "eval.max_batches=1",
                 "eval.every_steps=0", "eval.before_training=false", "eval.metrics=[perplexity]",
                 "checkpoint.save_final=false", "optim.warmup_steps=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    with open(out, "w") as f:
        code = subprocess.run([sys.executable, "-m", "collie", "train", "configs/quickstart.yaml", *overrides],
                              stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**env, "COLUMNS": "80"},
                              timeout=600).returncode
    lines = out.read_text().splitlines()
    assert code == 0, "\n".join(lines)
    entries = [line for line in lines if ENTRY.match(line)]
    others = [line for line in lines if not ENTRY.match(line) and not line.startswith("final evaluation: ")]
    assert not others, others  # nothing wrapped onto a line of its own, no progress bar frames
    assert sum("| loss " in line for line in entries) == 3
    assert max(map(len, entries)) > 120  # long entries stay whole at COLUMNS=80
    assert not any("━" in line for line in lines)


def test_an_entry_with_line_breaks_or_a_traceback_is_one_line():
    formatter = OneLineFormatter(LINE_FORMAT)
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord("collie", logging.ERROR, __file__, 1, "first\nsecond", None, sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line and "first | second" in line and "ValueError: bad | value" in line


def test_console_handler_off_a_terminal_is_plain():
    assert not sys.stdout.isatty()  # pytest captures the output
    handler = console_handler()
    assert isinstance(handler.formatter, OneLineFormatter)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from types import SimpleNamespace

    from collie.monitor import monitor
    trainer = SimpleNamespace(is_main_process=True, state=SimpleNamespace(step=0),
                              cfg=SimpleNamespace(train=SimpleNamespace(progress_bar=True, max_steps=3)))
    bar = monitor.ProgressBar()
    bar.on_train_begin(trainer)
    assert bar.progress is None  # pytest's captured output is no terminal
    monkeypatch.setattr(monitor, "console_is_terminal", lambda: True)
    bar.on_train_begin(trainer)
    assert bar.progress is not None
    bar.on_train_end(trainer)
