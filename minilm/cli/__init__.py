"""The `minilm` command: the one place that wires config, data, model, training, LoRA and files together.

One module per command (train, sample, finetune, merge, compare, bench; hf holds import-hf and export-hf), each with `add_parser`,
which registers its subcommand, and `run(args) -> int`, which does it; fit.py is the training loop
that train and finetune share, flags.py turns config dataclass fields into flags. A command module
imports at its top only what its parser needs; what running it needs (JAX, lora, matplotlib, ...) it
imports in `run`, so `minilm --help` and each command load no more than they use.

Bad input ends in one line on stderr, `minilm CMD: error: ...`, and exit status 2, never a traceback:
a MinilmError from anywhere, an OSError (a path too long, a folder without permission, a full disk),
or running out of memory. A library warning (an adapter too old to check, say) is one line too,
`minilm CMD: notice: ...`. An interrupted training run saves its checkpoint first (fit.py).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

from minilm import allocator
from minilm.cli import bench, compare, finetune, hf, merge, peft, sample, train
from minilm.errors import MinilmError

COMMANDS = (train, sample, finetune, merge, compare, hf, peft, bench)  # in the order `minilm --help` lists them


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors (a flag's bad value, an unknown flag) are one line as every other
    error is, pointing to --help instead of printing the whole usage; subcommands' parsers are Parsers too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse reads `--lr -1e-3` or `--lr -inf` as a missing value followed by an unknown flag, since only
        # -N and -N.N look like numbers to it; let every float spelling through so the config can judge it.
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def shorten(text: str, keep: int = 120) -> str:
    """A path of thousands of characters, as an error message shows it: its start and its end."""
    return text if len(text) <= keep else f"{text[:keep // 2]}...({len(text):,} characters)...{text[-keep // 2:]}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="minilm",
        description="A textbook GPT in JAX: train it on toy corpora, sample from it, and see what "
                    "fine-tuning changes.")
    commands = parser.add_subparsers(title="commands", dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv=None) -> int:
    if argv is None:  # a real command line (not a call from Python): restart once with glibc's tunables
        allocator.restart_with_tunables()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own parser, so the line reads `minilm CMD: error: ...` too
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")

    def say(kind: str, message) -> None:
        print(f"minilm {args.command}: {kind}: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: say("notice", message)
        try:
            return args.run(args)
        except MinilmError as e:
            say("error", e)
        except OSError as e:
            where = f": {shorten(str(e.filename))}" if e.filename else ""
            say("error", f"{e.strerror or e}{where}")
        except MemoryError:
            say("error", "out of memory; choose a smaller model, batch or --num-samples")
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        except Exception as e:  # XLA's own out-of-memory error, raised from compiled code
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            say("error", "out of memory in XLA (RESOURCE_EXHAUSTED); choose a smaller model, batch or "
                         "--num-samples")
    return 2
