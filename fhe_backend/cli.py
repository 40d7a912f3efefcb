"""The `fhe-backend` command: demo, serve, bench, explain.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and
`run(args) -> int`; only the chosen one is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

SUBCOMMANDS = {
    "demo": ("fhe_backend.demo", "train small digits models, compile them with backend 'fhe', run one encrypted"),
    "serve": ("fhe_backend.deployment.server", "serve saved FHE modules over HTTP (FastAPI on uvicorn)"),
    "bench": ("benchmarks.runner", "run the benchmark targets and write results.json/.md and a plot"),
    "explain": ("fhe_backend.explain", "report what of a model runs in FHE, without generating keys"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fhe-backend", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.print_help() if not argv else parser.parse_args(argv)
        return 0 if not argv else 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"fhe-backend {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
