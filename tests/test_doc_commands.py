"""Every shell command in README.md, docs/*.md and examples/README.md runs, so that a documented command that
fails or hangs fails CI.

The commands are read from the ```` ```bash ```` blocks (a command may continue over lines with a trailing ``\\``
or inside a quoted argument; ``NAME=…`` and ``name() {…}`` lines are kept as the prelude of the block's later
commands; a block of ``$ command`` lines followed by output is a transcript, and the output must appear).
Blocks marked ``runnable`` run as written in tests/test_runnable_docs.py. Each command runs in a scratch
directory that links the repository's folders (relative outputs/… stay there), in its runnable form: placeholders
filled in, ``torchrun`` → ``python -m torch.distributed.run --standalone``, and short-run overrides appended
(SHORT_RUN, SHORTER). It must exit 0 within its timeout (a hang is killed and fails) without a traceback or a
``collie: error``. What cannot run here is listed, with the reason, in NOT_RUN; every other command runs.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LINKED = ("benchmarks", "configs", "data", "examples", "models", "tests")
TIMEOUT_S = 300  # generous for 4 ranks on 2 busy cores; there to turn a hang into a failure
EIGHT_RANKS = "8 ranks on 2 CPU cores (~1 min each): opt-in with COLLIE_TEST_8RANK=1, as in tests/distributed"

# Commands that do not run here, each with the reason (the key is the command as written, spaces collapsed).
NOT_RUN = {
    "python3 -m venv .venv && . .venv/bin/activate": "installs: .ci/run does exactly this before the tests",
    'pip install -e ".[dev]"': "installs: .ci/run does exactly this before the tests",
    "python -m pytest -q": "the test suite itself",
    "python -m pytest tests/distributed -q": "part of the test suite itself",
    "COLLIE_TEST_8RANK=1 python -m pytest tests/distributed -q -k dp2_tp2_pp2": "the test suite's opt-in 8-rank run",
    "python benchmarks/run_gpu.py --out outputs/bench_gpu": "GPU only: 1B and 7B models at seq 2048",
    "python benchmarks/run_gpu.py --suites 1b --peak-tflops 989": "GPU only: a 1B model at seq 2048",
    "torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 --rdzv-id job1 -m collie "
    "train configs/my_job.yaml parallel.tp=8 parallel.pp=2": "two nodes of 8 GPUs (rendezvous at host node0)",
    "torchrun --nproc_per_node 1 -m collie train $BASE model.card=llama-1b train.micro_batch_size=4 "
    "train.output_dir=outputs/v1": "GPU only: the validation run of a 1.1B model at seq 2048",
    "measure outputs/v1": "reads the GPU validation run above",
    "torchrun --nproc_per_node 8 -m collie train configs/sft_3d.yaml": EIGHT_RANKS,
    "torchrun --nproc_per_node 8 examples/pretrain.py configs/pretrain_3d.yaml": EIGHT_RANKS,
    "torchrun --standalone --nproc_per_node 8 tests/distributed/harness.py dp2_tp2_pp2": EIGHT_RANKS,
    "torchrun --standalone --nproc_per_node 8 -m collie train CONFIG parallel.tp=2 parallel.pp=2 "
    "parallel.zero_stage=3": EIGHT_RANKS,
}
# Placeholders in the docs (whole words) and what stands in for them.
PLACEHOLDERS = {"configs/my_job.yaml": "configs/sft_tiny.yaml", "GRID": "configs/bench/optimizers_tiny.yaml",
                "DIR": "outputs/bench_overrides", "CONFIG": "configs/sft_3d.yaml", "...": "--card llama2-7b"}
# Appended to every command of a kind: a couple of steps, one evaluation batch, few generated tokens.
SHORT_RUN = {"train": ["train.max_steps=2", "optim.warmup_steps=0", "eval.max_batches=1", "eval.max_new_tokens=4",
                       "train.progress_bar=false"],
             "generate": ["--max-new-tokens", "4"], "chat": ["--max-new-tokens", "4"],
             "bench": ["--steps", "1", "--warmup", "0", "optim.warmup_steps=0"]}
SHORT_RUN["compare"] = SHORT_RUN["train"]
# Appended to single commands that would run many jobs: fewer of them (same code paths).
SHORTER = {
    "collie bench configs/bench/layouts_tiny.yaml": ["--only", "pp2"],
    "collie bench configs/bench/fused_tiny.yaml --repeat 3": ["--only", "adamw", "--repeat", "1"],
    "collie bench configs/bench/optimizers_tiny.yaml --only adamw lion": ["--only", "lion"],
    "collie bench GRID model.card=tiny --steps 3 --warmup 1 --out DIR": ["--only", "adamw"],
    "python examples/compare_optimizers.py configs/sft_optimizers.yaml": ["--optimizers", "adamw"],
    "python examples/compare_optimizers.py configs/sft_optimizers.yaml --nproc 4 parallel.tp=2 --optimizers adamw "
    "lomo": ["--optimizers", "lomo"],
    "python examples/compare_optimizers.py configs/sft_optimizers.yaml --optimizers adamw lion lomo":
        ["--optimizers", "lion"],
    "python benchmarks/run_gpu.py --smoke --out outputs/bench_smoke": ["--suites", "7b"],
}
# Outputs that a command of another section or document reads, and the documented command that writes them.
PRODUCERS = {
    "outputs/tiny-gpt2": "python -c \"import transformers as t; t.AutoModelForCausalLM.from_config(t.GPT2Config("
                                  "vocab_size=512, n_embd=64, n_layer=2, n_head=4)).save_pretrained('outputs/tiny-gpt2')"
                                  "\" && collie train configs/quickstart.yaml model.backend=hf "
                                  "model.pretrained=outputs/tiny-gpt2 train.output_dir=outputs/hf-gpt2",
    "outputs/quickstart/": "collie train configs/quickstart.yaml",
    "outputs/lora/": 'collie train configs/sft_tiny.yaml peft.method=lora peft.r=8 '
                     '"peft.target_modules=[q_proj,v_proj]" train.output_dir=outputs/lora',
}


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # as written, continuations joined and comments dropped
    prelude: tuple[str, ...] = ()  # the block's variable and function definitions before it
    expected: tuple[str, ...] = ()  # a transcript's output lines

    @property
    def key(self) -> str:
        return " ".join(self.text.split())

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


# --- reading the docs ------------------------------------------------------------------------------------------

def logical_lines(code: str) -> list[tuple[int, str]]:
    """(line offset, command) of a shell block: ``\\``-newline joins, quotes may span lines, ``#`` comments go."""
    commands, current, quote, start, line, i = [], "", None, 0, 0, 0
    while i < len(code):
        char = code[i]
        if char == "\\" and quote != "'" and code[i + 1:i + 2] == "\n":
            current, line, i = current + " ", line + 1, i + 2
            continue
        if quote is None and char == "#" and (not current or current[-1].isspace()):
            while i < len(code) and code[i] != "\n":
                i += 1
            continue
        if char == "\n":
            line += 1
            if quote is None:
                if current.strip():
                    commands.append((start, current.strip()))
                current, start = "", line
                i += 1
                continue
        elif char in "'\"" and quote in (None, char):
            quote = None if quote else char
        current, i = current + char, i + 1
    return commands


def is_definition(text: str) -> bool:
    """A shell function or variable definitions only: kept as the prelude of the block's later commands."""
    if re.match(r"^\w+\(\)\s*\{", text):
        return True
    return all(re.match(r"^[A-Za-z_]\w*=", word) for word in shlex.split(text))


def block_commands(doc: str, first_line: int, code: str) -> list[Command]:
    if any(line.startswith("$ ") for line in code.splitlines()):  # a transcript: $ command, then its output
        commands = []
        for offset, line in enumerate(code.splitlines()):
            if line.startswith("$ "):
                commands.append(Command(doc, first_line + offset, line[2:].strip()))
            elif commands and line.strip():
                last = commands[-1]
                commands[-1] = Command(last.doc, last.line, last.text, expected=(*last.expected, line.strip()))
        return commands
    commands, prelude = [], []
    for offset, text in logical_lines(code):
        if is_definition(text):
            prelude.append(text)
        else:
            commands.append(Command(doc, first_line + offset, text, tuple(prelude)))
    return commands


def documented_commands() -> list[Command]:
    """Every command of the bash blocks not marked runnable, in document order."""
    found = []
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            words = match["info"].split()
            if words[:1] in (["bash"], ["sh"]) and "runnable" not in words:
                first_line = text.count("\n", 0, match.start("code")) + 1
                found += block_commands(str(path.relative_to(ROOT)), first_line, match["code"])
    return found


# --- the runnable form -------------------------------------------------------------------------------------------

def split_pipeline(text: str) -> list[str]:
    """The simple commands of ``text`` and the operators between them (``|``, ``&&``, ``||``, ``;``)."""
    parts, current, quote, i = [], "", None, 0
    while i < len(text):
        char = text[i]
        if quote is None and (text.startswith(("&&", "||"), i) or char in "|;"):
            op = text[i:i + 2] if text.startswith(("&&", "||"), i) else char
            parts += [current, op]
            current, i = "", i + len(op)
            continue
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        current, i = current + char, i + 1
    return [*parts, current]


def job_kind(words: list[str]) -> str | None:
    """What a simple command runs: train, compare, generate, chat, bench (shortened by SHORT_RUN), or None."""
    text = " ".join(words)
    if re.search(r"(^|\s)collie (train|generate|chat|bench) |-m collie train |-m collie\.train ", text + " "):
        kind = re.search(r"collie(?: |\.)(train|generate|chat|bench)", text)[1]
        return None if kind == "bench" and "--dry-run" in words else kind
    if re.search(r"examples/(sft|pretrain|custom_model)\.py", text):
        return "train"
    return "compare" if "examples/compare_optimizers.py" in text else None


def runnable_simple(segment: str, extra: list[str]) -> str:
    words = shlex.split(segment)
    if not words:
        return segment
    if words[0] == "torchrun":
        launcher = "python -m torch.distributed.run" + ("" if "--standalone" in words else " --standalone")
        segment = segment.replace("torchrun", launcher, 1)
    added = SHORT_RUN.get(job_kind(words), []) + extra
    return segment.rstrip() + "".join(f" {shlex.quote(word)}" for word in added) + (" " if segment.endswith(" ")
                                                                                      else "")


def runnable_form(command: Command) -> str:
    """The command as the test runs it: placeholders filled, torchrun standalone, short-run overrides."""
    text = command.text
    for placeholder, value in PLACEHOLDERS.items():
        text = re.sub(rf"(?<!\S){re.escape(placeholder)}(?!\S)", value, text)
    parts = split_pipeline(text)
    parts[0] = runnable_simple(parts[0], SHORTER.get(command.key, []))
    parts[1:] = [p if p in ("|", "&&", "||", ";") else runnable_simple(p, []) for p in parts[1:]]
    return "\n".join([*command.prelude, "".join(parts)])


# --- running -----------------------------------------------------------------------------------------------------

@dataclass
class Result:
    code: int | None  # None: killed at the timeout
    output: str
    seconds: float
    cwd: Path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own)."""
    children = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found, todo = found + below, todo + below
    return found


def kill_tree(process: subprocess.Popen) -> None:
    for pid in [*descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def execute(script: str, cwd: Path, timeout_s: float) -> Result:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "XDG_CACHE_HOME": str(cwd / ".cache"), "MPLCONFIGDIR": str(cwd / ".cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    process = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdin=subprocess.DEVNULL, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        code = process.returncode
    except subprocess.TimeoutExpired:
        kill_tree(process)
        output, code = process.communicate()[0], None
    return Result(code, output, time.monotonic() - start, cwd)


class Runner:
    """Runs each runnable form once, in a fresh scratch directory or in its producer's (see PRODUCERS)."""

    def __init__(self, base: Path, by_key: dict[str, Command]):
        self.base, self.by_key, self.results = base, by_key, {}

    def run(self, command: Command) -> Result:
        form = runnable_form(command)
        if form not in self.results:
            self.results[form] = self._run(command, form)
        return self.results[form]

    def _run(self, command: Command, form: str) -> Result:
        producer = next((self.by_key[key] for path, key in PRODUCERS.items()
                         if path in command.text and key != command.key), None)
        if producer is not None:
            before = self.run(producer)
            if before.code != 0:
                return Result(-1, f"its input comes from `{producer.text}` ({producer.where}), which failed",
                              0.0, before.cwd)
            cwd = before.cwd
        else:
            cwd = self.base / f"{len(self.results):02d}"
            cwd.mkdir()
            for name in LINKED:
                (cwd / name).symlink_to(ROOT / name, target_is_directory=True)
        return execute(form, cwd, TIMEOUT_S)


COMMANDS = documented_commands()
BY_KEY = {c.key: c for c in reversed(COMMANDS)}  # the first place a command is written


def to_run() -> list:
    """One test per runnable form (the same command in two documents runs once), skips marked."""
    params, seen = [], set()
    for command in COMMANDS:
        form = runnable_form(command)
        if form in seen:
            continue
        seen.add(form)
        marks = []
        reason = NOT_RUN.get(command.key)
        if reason and not (reason == EIGHT_RANKS and os.environ.get("COLLIE_TEST_8RANK")):
            marks.append(pytest.mark.skip(reason=reason))
        if "torchrun" in command.text:
            marks.append(pytest.mark.distributed)
        params.append(pytest.param(command, id=command.where, marks=marks))
    return params


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner(tmp_path_factory.mktemp("doc_commands"), BY_KEY)


@pytest.mark.parametrize("command", to_run())
def test_documented_command_runs(command, runner):
    result = runner.run(command)
    places = ", ".join(c.where for c in COMMANDS if runnable_form(c) == runnable_form(command))
    report = (f"{places}: {command.text}\nran as: {runnable_form(command)}\nin {result.cwd}, "
              f"{result.seconds:.0f} s\n--- output (last 4000 characters)\n{result.output[-4000:]}")
    assert result.code is not None, f"killed after {result.seconds:.0f} s (a hang?)\n{report}"
    assert "Traceback (most recent call last)" not in result.output, report
    if command.expected:  # a transcript: its shown output appears (… stands for an elided part)
        for line in command.expected:
            assert all(part.strip() in result.output for part in line.split("…")), f"{line!r} not shown\n{report}"
        assert (result.code != 0) == any("error" in line for line in command.expected), report
        return
    assert result.code == 0, f"exit code {result.code}\n{report}"
    assert not re.search(r"^collie( \w+)?: error", result.output, re.MULTILINE), report


# --- the tables stay honest ---------------------------------------------------------------------------------------

def test_commands_are_found_in_every_form():
    by_doc = {}
    for command in COMMANDS:
        by_doc.setdefault(command.doc, []).append(command)
    assert len(COMMANDS) >= 40 and {"README.md", "docs/guide.md", "docs/estimate.md"} <= set(by_doc)
    quoted = [c for c in COMMANDS if '--prompt "### Instruction:\n' in c.text]  # a prompt over several lines
    assert quoted and all(c.text.endswith('\n\n### Response:\n"') for c in quoted)
    sampled = [c for c in COMMANDS if "--temperature 0.8" in c.text][0]  # continued with a backslash
    assert sampled.text.endswith('--prompt "Which is larger: 39 or 25?"') and "\\" not in sampled.text
    assert [c.text for c in by_doc["docs/estimate.md"] if c.text.startswith("predict ")][0].endswith("--gpus 1")
    assert len([c for c in by_doc["docs/estimate.md"] if c.text.startswith("predict ")][0].prelude) == 3
    transcript = [c for c in COMMANDS if c.expected]
    assert [c.text for c in transcript] == ["collie train configs/sft_tiny.yaml optim.nmae=lion"]


def test_runnable_forms():
    def form(text: str) -> str:
        return runnable_form(Command("x.md", 1, text))
    assert form("torchrun --nproc_per_node 2 -m collie train c.yaml parallel.tp=2") == \
        "python -m torch.distributed.run --standalone --nproc_per_node 2 -m collie train c.yaml parallel.tp=2 " \
        + " ".join(SHORT_RUN["train"])
    assert form("collie estimate c.yaml --gpus 8 | grep x").endswith("--gpus 8 | grep x")
    assert form("collie generate d --prompt 'a | b'") == "collie generate d --prompt 'a | b' --max-new-tokens 4"
    assert form("collie bench GRID --dry-run") == "collie bench configs/bench/optimizers_tiny.yaml --dry-run"
    assert form("python examples/sft.py c.yaml").endswith("c.yaml " + " ".join(SHORT_RUN["train"]))


def test_every_table_entry_names_a_documented_command():
    documented = {c.key for c in COMMANDS}
    for table in (NOT_RUN, SHORTER):
        assert sorted(set(table) - documented) == []
    assert set(PRODUCERS.values()) <= documented and not set(PRODUCERS.values()) & set(NOT_RUN)
