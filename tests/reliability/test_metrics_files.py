"""metrics.jsonl is strict JSON (NaN and ±inf as strings); it and metrics.csv hold each step once after a resume,
also when the crash cut the last line short (the resumed-run case end to end: test_checkpoint_integrity)."""
import json
import math

from collie.monitor.sinks import JsonlSink


def strict_rows(path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"bare {constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def test_non_finite_values_are_strict_json(tmp_path):
    sink = JsonlSink(str(tmp_path))
    sink.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": -math.inf, "nested": [float("nan"), 1.0]})
    sink.close()
    (row,) = strict_rows(tmp_path / "metrics.jsonl")
    assert row == {"step": 1, "loss": "NaN", "grad_norm": "Infinity", "lr": "-Infinity", "nested": ["NaN", 1.0]}
    assert math.isnan(float(row["loss"])) and float(row["grad_norm"]) == math.inf


def test_a_resumed_run_replaces_the_recomputed_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 6)] + [{"step": 4, "eval/perplexity": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # cut short by a crash
    sink = JsonlSink(str(tmp_path))  # resumed at step 2: the next logged step is 3
    for step in (3, 4):
        sink.write(step, {"loss": 1.0})
    sink.close()
    assert [(r["step"], r["loss"]) for r in strict_rows(path)] == [(1, 9.0), (2, 8.0), (3, 1.0), (4, 1.0)]


def test_metrics_csv_also_holds_each_step_once_after_a_resume(tmp_path):
    import csv
    from collie.monitor.sinks import CsvSink
    first = CsvSink(str(tmp_path))
    for step in range(1, 6):
        first.write(step, {"loss": 10.0 - step})
    first.write(4, {"eval/perplexity": 3.0})
    first.close()
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("6,4.")  # cut short by a crash
    resumed = CsvSink(str(tmp_path))  # resumed at step 2
    for step in (3, 4):
        resumed.write(step, {"loss": 1.0})
    resumed.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "9.0"), ("2", "8.0"), ("3", "1.0"), ("4", "1.0")]
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "eval_metrics.csv"))] == ["4"]  # no eval rewritten
