"""The command line's manners: --version, help for every flag, quiet exit into a closed pipe, and paths that
are not there explained (relative to what, and that collie never downloads)."""
import argparse
import os
import subprocess
import sys

import pytest

import collie
from collie.bench.cli import build_parser as bench_parser
from collie.cli import main
from collie.data.tokenizer import load_tokenizer
from collie.errors import ConfigError, DataError
from collie.estimate.cli import build_parser as estimate_parser
from collie.estimate.cli import estimate_main
from collie.models.hf_io import read_hf_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_NAME = "meta-llama/Llama-2-7b"


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"collie {collie.__version__}"


@pytest.mark.parametrize("parser", [estimate_parser, bench_parser], ids=["estimate", "bench"])
def test_every_flag_has_help(parser):
    actions = [a for a in parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) >= 8
    assert [a.dest for a in actions if not a.help or a.help == argparse.SUPPRESS] == []


@pytest.mark.parametrize("launcher", [["-m", "collie", "estimate"], ["-m", "collie.estimate"]])
def test_a_closed_pipe_ends_the_output_quietly(launcher):
    """`collie estimate … | head -5`: the reader leaves early; no BrokenPipeError traceback."""
    process = subprocess.Popen([sys.executable, *launcher, "--card", "llama2-7b", "--plan", "--gpus", "16"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    process.stdout.close()  # the reader is gone before the first line is written
    error = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1
    assert error == ""


def test_a_hub_name_as_model_directory_is_explained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        read_hf_config(HUB_NAME)
    message = str(error.value)
    assert f"model directory '{HUB_NAME}' does not exist" in message
    assert f"relative paths resolve against the current directory {tmp_path}" in message
    assert "looks like a hub name, and collie never downloads" in message and "pass the local directory" in message


def test_a_missing_absolute_path_says_collie_never_downloads(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; collie reads local files only and never downloads"):
        read_hf_config(tmp_path / "nowhere")


def test_a_hub_name_as_tokenizer_is_explained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"tokenizer '{HUB_NAME}' does not exist.*current directory {tmp_path}.*"
                                        "looks like a hub name, and collie never downloads"):
        load_tokenizer(HUB_NAME)


def test_model_pretrained_hub_name_through_the_command_line(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert estimate_main(["configs/quickstart.yaml", f"model.pretrained={HUB_NAME}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"collie estimate: error: ConfigError: model directory '{HUB_NAME}' does not exist")
    assert "collie never downloads: download it yourself" in error
