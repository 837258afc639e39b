"""Run the code blocks of README.md and docs/*.md that are marked runnable: a fence whose info string holds the
word ``runnable`` (```` ```bash runnable ```` or ```` ```python runnable ````).

The blocks of one file run in order, each in a fresh shell or interpreter, in one scratch directory that links
the repository's configs/, data/, examples/ and models/ (so later blocks may use what earlier ones wrote under
outputs/). The tokenized-data cache goes to the scratch directory too. A block fails the test when it exits
non-zero; make the block check its result (``grep -q``, ``assert``) when the exit code alone would not.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LINKED = ("configs", "data", "examples", "models")
INTERPRETERS = {"bash": ["bash", "-e"], "sh": ["bash", "-e"], "python": [sys.executable]}
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def runnable_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, code) of every block marked runnable, in order."""
    blocks = []
    text = path.read_text(encoding="utf-8")
    for match in FENCE.finditer(text):
        words = match["info"].split()
        if "runnable" in words[1:]:
            if words[0] not in INTERPRETERS:
                raise ValueError(f"{path.name}, line {text.count(chr(10), 0, match.start()) + 1}: runnable block "
                                 f"in {words[0]!r}; runnable languages: {', '.join(INTERPRETERS)}")
            blocks.append((text.count("\n", 0, match.start()) + 1, words[0], match["code"]))
    return blocks


def scratch_directory(tmp_path: Path) -> Path:
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    return tmp_path


def run_block(language: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / ("block.py" if language == "python" else "block.sh")
    script.write_text(code)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "XDG_CACHE_HOME": str(cwd / ".cache"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*INTERPRETERS[language], str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)


def test_the_marker_is_found():
    assert [language for _, language, _ in runnable_blocks(ROOT / "docs" / "guide.md")] == ["bash"] * 3
    assert [language for _, language, _ in runnable_blocks(ROOT / "docs" / "extending.md")] == ["python"] * 2
    assert runnable_blocks(ROOT / "docs" / "configuration.md") == []


@pytest.mark.parametrize("path", [p for p in DOCUMENTS if runnable_blocks(p)], ids=lambda p: p.name)
def test_runnable_blocks_succeed(path, tmp_path):
    cwd = scratch_directory(tmp_path)
    for line, language, code in runnable_blocks(path):
        result = run_block(language, code, cwd)
        assert result.returncode == 0, (f"{path.name}, block at line {line} exited with {result.returncode}:\n{code}\n"
                                        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
