"""``fhe-backend serve``: the model server on uvicorn (the default) or on Ray Serve (``--engine ray``).

Both engines run the one FastAPI application of `fhe_backend.deployment.server`; this module only
adds the ``--engine`` switch and the Ray options (`fhe_backend.deployment.ray_serve`, which
imports Ray only when it runs) to the server's options, and hands the parsed arguments to the
chosen engine.
"""

from __future__ import annotations

import argparse

from . import server

ENGINES = ("uvicorn", "ray")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options, ``--engine`` and the Ray engine's options."""
    server.add_arguments(parser)
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="uvicorn",
        help="uvicorn: this machine (--workers); ray: a Ray Serve deployment over a Ray cluster "
        "(pip install 'fhe-backend[ray]'; see docs/ray.md) (default uvicorn)",
    )
    from .ray_serve import add_arguments as add_ray_arguments  # imports no Ray

    add_ray_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Serve with the chosen engine until stopped; the process's exit status."""
    if args.engine == "ray":
        from . import ray_serve

        return ray_serve.run(args)
    return server.run(args)


__all__ = ["ENGINES", "add_arguments", "run"]
