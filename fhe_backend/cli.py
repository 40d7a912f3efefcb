"""The `fhe-backend` command: demo, serve, bench, explain.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and
`run(args) -> int`; only the chosen one is imported. The process exits with the subcommand's
status (1 on an `FheBackendError`, printed as one line), also after Concrete ran a circuit
(see `fhe_backend.exit_status`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .errors import FheBackendError

SUBCOMMANDS = {
    "demo": (
        "fhe_backend.demo",
        "train small digits models, compile them with backend 'fhe', run one encrypted",
    ),
    "serve": (
        "fhe_backend.deployment.serve_command",
        "serve saved FHE modules over HTTP (FastAPI on uvicorn, or Ray Serve with --engine ray)",
    ),
    "bench": (
        "fhe_backend.benchmarks.runner",
        "run the benchmark targets and write results.json/.md and a plot",
    ),
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
    arguments = sub.parse_args(argv[1:])
    try:
        return int(module.run(arguments) or 0)
    except FheBackendError as error:
        print(f"fhe-backend {name}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
