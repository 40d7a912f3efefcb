"""A worker process of the ``processes`` runner: evaluates serialized samples with Concrete.

Started by `fhe_backend.process_executor` as ``python process_worker.py`` (this file, run by
path: it imports the standard library and Concrete only, not this package nor torch, and never
the user's main script). It reads requests from standard input and writes results to the
standard output it had at start (anything printed goes to standard error): each message is
one pickled object. A request is ``((server digest, server path), (keys digest, keys path),
[serialized sample, ...])``; the answer is ``("ok", [serialized outputs, ...])`` or
``("error", "Type: message")``. Circuits and key sets are loaded once per digest and a few are
kept.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Sequence, Tuple

SerializedSample = Tuple[bytes, ...]
WORKER_CACHE = 4  # circuits and key sets one worker keeps loaded

_SERVERS: "OrderedDict[str, Any]" = OrderedDict()
_KEYS: "OrderedDict[str, Any]" = OrderedDict()


def _cached(cache: "OrderedDict[str, Any]", digest: str, load: Any) -> Any:
    if digest not in cache:
        cache[digest] = load()
        while len(cache) > WORKER_CACHE:
            cache.popitem(last=False)
    cache.move_to_end(digest)
    return cache[digest]


def evaluate_serialized(
    server: Tuple[str, str], keys: Tuple[str, str], samples: Sequence[SerializedSample]
) -> List[SerializedSample]:
    """Evaluate serialized samples with the circuit and keys named by (digest, path)."""
    from concrete import fhe

    circuit = _cached(_SERVERS, server[0], lambda: fhe.Server.load(server[1]))
    evaluation_keys = _cached(
        _KEYS, keys[0], lambda: fhe.EvaluationKeys.deserialize(Path(keys[1]).read_bytes())
    )
    outputs = []
    for sample in samples:
        result = circuit.run(*[fhe.Value.deserialize(v) for v in sample], evaluation_keys=evaluation_keys)
        results = result if isinstance(result, tuple) else (result,)
        outputs.append(tuple(r.serialize() for r in results))
    return outputs


def serve() -> None:
    """Answer requests on standard input until it closes."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints (Concrete's, the user's) must not reach the answer stream
    requests = sys.stdin.buffer
    while True:
        try:
            server, keys, samples = pickle.load(requests)
        except EOFError:
            return
        try:
            answer: Any = ("ok", evaluate_serialized(server, keys, samples))
        except Exception as error:  # noqa: BLE001 - sent back and raised in the client
            answer = ("error", f"{type(error).__name__}: {error}")
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()


if __name__ == "__main__":
    serve()
