"""Docs stay true to the code: the configuration reference is regenerated, and the 70B plan in estimate.md is
the output of the command it names."""
import os
import re
import shlex

from collie.config_reference import render
from collie.estimate.cli import estimate_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configuration_reference_is_current():
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        assert f.read() == render(), "regenerate with: python -m collie.config_reference > docs/configuration.md"


def plan_section() -> str:
    with open(os.path.join(ROOT, "docs", "estimate.md")) as f:
        text = f.read()
    start = text.index("## Plan: Llama-2-70B")
    return text[start:text.index("\n## ", start + 1)]


def documented_commands(section: str) -> list[list[str]]:
    """The `collie estimate …` commands quoted inline (a quote may wrap onto the next line)."""
    return [shlex.split(m.replace("\n", " "))[2:] for m in re.findall(r"`(collie estimate [^`]+)`", section)]


def printed(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert estimate_main(argv) == 0
    return capsys.readouterr().out


def test_the_70b_plan_table_is_the_commands_output(capsys):
    section = plan_section()
    plan_argv, detail_argv = documented_commands(section)
    table = [line for line in section.split("The top row in detail")[0].splitlines() if line.startswith("|")]
    output = printed(plan_argv, capsys)
    assert len(table) > 10
    assert table == [line for line in output.splitlines() if line.startswith("|")], \
        f"regenerate the table in docs/estimate.md with: collie estimate {shlex.join(plan_argv)}"
    per_rank = re.search(r"per pipeline rank: ([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+) GiB",
                         printed(detail_argv, capsys)).groups()
    assert f"first stage {per_rank[0]} GiB" in section and f"stages 2–4: {', '.join(per_rank[1:])} GiB" in section
