"""The ``pretok`` console script: one subcommand per job module."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("jobs.demo", "synthetic data -> tokenizer -> pretokenize -> generator -> samples, in one folder"),
    "pretokenize": ("jobs.pretokenize", "tokenize an image dataset into Parquet token shards on Ray"),
    "train-tokenizer": ("jobs.train_tokenizer", "train a small single-stage TiTok on images"),
    "train-generator": ("jobs.train_generator", "train a masked generator on token shards"),
    "sample": ("jobs.sample", "sample tokens from a generator and decode them to a PNG grid"),
    "inspect": ("jobs.inspect", "a shard's stats and an original-vs-reconstruction contact sheet"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: pretok COMMAND [ARGS...]\n\ncommands:\n{rows}\n\n'pretok COMMAND --help' for a command's options."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pretok: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
