"""``collie train | convert | generate`` — the command line (also ``python -m collie`` and ``torchrun -m collie``)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from collie.errors import CollieError


def cmd_train(args) -> int:
    from collie.config import CollieConfig
    from collie.trainer import Trainer
    cfg = CollieConfig.load(args.config, args.overrides)
    trainer = Trainer(cfg)
    results = trainer.fit()
    if results and trainer.is_main_process:
        print("final evaluation: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in results.items()))
    return 0


def cmd_convert(args) -> int:
    from collie.builders import DTYPES
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.merge:
        from collie.peft import merge_adapter
        merge_adapter(args.checkpoint, args.merge, args.out, dtype)
        print(f"merged adapter {args.merge} into {args.checkpoint}: wrote Hugging Face model to {args.out}")
        return 0
    from collie.checkpoint import export_to_hf
    written = export_to_hf(args.checkpoint, args.out, dtype, adapter=args.adapter)
    print(f"wrote {written} to {args.out}")
    return 0


def cmd_generate(args) -> int:
    """Each prompt as a user turn in the model's chat template (``--raw``: the prompt as is, printed with its
    continuation); a warning on stderr for every prompt that got no text."""
    from collie.evaluation.chat import find_chat_template
    from collie.evaluation.generation import generate_text
    model, tokenizer = _load_for_generation(args)
    template = None if args.raw else find_chat_template(args.model, tokenizer, args.tokenizer, args.template)
    outputs = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                            args.seed, args.stop or (), template=template)
    for i, (prompt, out) in enumerate(zip(args.prompt, outputs)):
        print(f"{prompt}{out}" if template is None else f"{prompt}\n{out}\n")
        if not out.strip():
            print(f"collie: warning: prompt {i + 1} generated nothing (its first token was EOS or a stop string); "
                  f"{'drop --raw to apply the chat template' if args.raw else _template_hint(template)}",
                  file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """Chat on stdin/stdout: one user turn per line until EOF or /exit, answers streamed as generated."""
    from collie.evaluation.chat import chat_session, find_chat_template, require_template
    model, tokenizer = _load_for_generation(args)
    template = find_chat_template(args.model, tokenizer, args.tokenizer, args.template)
    require_template(template)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"collie chat ({template.name if template else 'no'} template): /exit or Ctrl-D ends, /reset "
              f"forgets the history", file=sys.stderr)

    def read_line():
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        return line or None

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()
    try:
        chat_session(model, tokenizer, template, read_line, write,
                     lambda m: print(f"collie: warning: {m}", file=sys.stderr), args.system, args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop or ())
    except KeyboardInterrupt:  # Ctrl-C ends the session quietly
        print(file=sys.stderr)
        return 130
    return 0


def _load_for_generation(args):
    from collie.data.tokenizer import load_tokenizer
    from collie.peft import load_model_or_adapter
    return load_model_or_adapter(args.model).eval(), load_tokenizer(args.tokenizer or args.model)


def _template_hint(template) -> str:
    if template is None:
        return "no chat template was found with the model: try --template NAME (the data.template it was trained with)"
    return f"chat template '{template.name}' applied; try --raw, or train longer"


def build_parser() -> argparse.ArgumentParser:
    from collie import __version__
    parser = argparse.ArgumentParser(prog="collie", description="Train LLMs with 3D parallelism.")
    parser.add_argument("--version", action="version", version=f"collie {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a YAML config")
    train.add_argument("config", help="YAML job config, e.g. configs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10 optim.lr=3e-4")
    train.set_defaults(run=cmd_train)
    convert = sub.add_parser("convert", help="export a training checkpoint (LoRA merged in) or base model + LoRA "
                                             "adapter (--merge) as a Hugging Face model directory")
    convert.add_argument("checkpoint", help="checkpoint directory, e.g. OUTPUT_DIR/checkpoints/step-00001000; "
                                            "with --merge: the base Hugging Face model directory")
    convert.add_argument("--merge", metavar="ADAPTER", help="peft LoRA adapter directory to merge into the base")
    convert.add_argument("--adapter", action="store_true", help="checkpoint of a peft.method=lora run: write its "
                         "peft adapter (base model in OUT/base_model) instead of the merged model")
    convert.add_argument("out", help="directory to write (config.json + safetensors)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights when saving")
    convert.set_defaults(run=cmd_convert)
    gen = sub.add_parser("generate", help="continue prompts with a saved model")
    gen.add_argument("model", help="Hugging Face model or LoRA adapter directory (e.g. OUTPUT_DIR/final)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    gen.add_argument("--tokenizer", help="tokenizer path if not in the model directory")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate at most per "
                                                                           "prompt (>= 1)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    gen.add_argument("--stop", action="append", help="stop string; the output ends before it (repeatable)")
    gen.add_argument("--raw", action="store_true", help="generate from each prompt as is, without the chat template")
    gen.add_argument("--template", help="chat template instead of the one saved with the model: a data.template "
                                        "name (alpaca, chatml, llama3, …) or a .jinja file")
    gen.set_defaults(run=cmd_generate)
    chat = sub.add_parser("chat", help="chat with a saved model on stdin/stdout (its chat template, the history, "
                                       "streamed answers; /exit or end of input stops)")
    chat.add_argument("model", help="Hugging Face model or LoRA adapter directory (e.g. OUTPUT_DIR/final)")
    chat.add_argument("--tokenizer", help="tokenizer path if not in the model directory")
    chat.add_argument("--template", help="chat template instead of the one saved with the model: a data.template "
                                         "name or a .jinja file")
    chat.add_argument("--system", help="a system message that starts the conversation")
    chat.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per answer at most (>= 1)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    chat.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    chat.add_argument("--stop", action="append", help="stop string; an answer ends before it (repeatable)")
    chat.set_defaults(run=cmd_chat)
    # listed for --help only: main() hands `collie estimate …` to collie.estimate.cli before parsing
    sub.add_parser("estimate", help="predict per-GPU memory and per-step communication of a job "
                                    "(collie estimate --help)")
    sub.add_parser("bench", help="run a grid of configurations for a few steps each and report tokens/s, MFU "
                                 "and memory (collie bench --help)")
    return parser


def main(argv=None) -> int:
    return quiet_on_broken_pipe(_dispatch, sys.argv[1:] if argv is None else list(argv))


def quiet_on_broken_pipe(run, *args) -> int:
    """``run(*args)``; when the reader of our stdout has gone (``collie estimate … | head -5``), exit with 1
    and no traceback, as Python's documentation advises for command-line tools."""
    try:
        code = run(*args)
        sys.stdout.flush()  # a closed pipe shows up here rather than in the interpreter's final flush
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # silence that final flush
        return 1


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["estimate"]:  # its own parser: see collie/estimate/cli.py
        from collie.estimate.cli import estimate_main
        return estimate_main(argv[1:])
    if argv[:1] == ["bench"]:  # its own parser: see collie/bench/cli.py
        from collie.bench.cli import bench_main
        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CollieError as e:
        print(f"collie: error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
        # a safety net for what collie's own checks missed: a file that cannot be read or decoded. A ValueError
        # or RecursionError raised outside the readers of user input keeps its traceback: it is a bug.
        if isinstance(e, (ValueError, RecursionError)) and not _from_user_input(e):
            raise
        print(f"collie: error: {_input_error(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from collie.distributed.watchdog import first_line, is_peer_failure
        if not is_peer_failure(e):
            raise
        print(f"collie: error: rank {os.environ.get('RANK', '0')} lost a peer in a collective ({first_line(e)}); "
              f"another rank failed first: its log (and torchrun's summary) says why", file=sys.stderr)
        return 1


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message from a library may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


# modules that read files the user names (configs, data, tokenizers, models, adapters) and the parsers they use
USER_INPUT_MODULES = ("collie.config", "collie.schema", "collie.data.", "collie.models.hf_io", "collie.peft.",
                      "json", "yaml", "codecs", "encodings.")


def _from_user_input(error: BaseException) -> bool:
    """Whether ``error`` was raised while collie read the user's files (not by a bug elsewhere)."""
    if isinstance(error, (UnicodeDecodeError, json.JSONDecodeError)):
        return True
    tb, modules = error.__traceback__, []
    while tb is not None:
        modules.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    return bool(modules) and modules[-1].startswith(USER_INPUT_MODULES)


def _input_error(error: BaseException) -> str:
    """One line for an error raised while reading user input."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{type(error).__name__}: cannot use '{error.filename}': {error.strerror or one_line(error)}"
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({one_line(error)}); save it as UTF-8"
    if isinstance(error, RecursionError):
        return "an input file is nested too deeply to read (RecursionError); check the JSON/YAML files given"
    return f"{type(error).__name__}: {one_line(error)}"


if __name__ == "__main__":
    sys.exit(main())
