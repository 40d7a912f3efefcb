"""The exit status survives concrete-python's exit callback (pytest, the CLI, plain scripts).

Each case runs in a subprocess that simulates a real circuit and then fails; without the fix in
`fhe_backend.exit_status` every one of them exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

SIMULATE = textwrap.dedent("""
    from concrete import fhe

    @fhe.compiler({"x": "encrypted"})
    def double(x):
        return fhe.univariate(lambda v: v * 2)(x)

    assert double.compile(range(10)).simulate(3) == 6
""")


def _run(args, cwd, **env):
    return subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        # raw Concrete compiles into folders it never removes: those of the scripts go with cwd
        env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(cwd), **env},
    )


def test_pytest_reports_a_failure_after_simulate(tmp_path):
    """A failing test that simulates makes pytest exit 1 (the project's conftest is used)."""
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tests / "test_fails.py").write_text(
        "def test_fails_after_simulate():\n" + textwrap.indent(SIMULATE, "    ") + "    assert False\n"
    )
    result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], tmp_path)
    assert "1 failed" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 1, result.stdout + result.stderr


def test_script_keeps_its_status_after_simulate(tmp_path):
    """A library user's script: importing fhe_backend is enough to keep `sys.exit(3)`."""
    script = tmp_path / "script.py"
    script.write_text("import sys\nimport fhe_backend\n" + SIMULATE + "sys.exit(3)\n")
    assert _run([sys.executable, str(script)], tmp_path).returncode == 3


def test_uncaught_error_after_simulate_exits_1(tmp_path):
    """An exception after a simulation still ends the process with status 1."""
    script = tmp_path / "script.py"
    script.write_text("import fhe_backend\n" + SIMULATE + "raise RuntimeError('boom')\n")
    result = _run([sys.executable, str(script)], tmp_path)
    assert result.returncode == 1 and "boom" in result.stderr


def test_cli_fails_after_simulate(tmp_path):
    """`fhe-backend explain` on a factory that simulates, then returns no module: exit 1."""
    (tmp_path / "bad_factory.py").write_text(SIMULATE + "\ndef build():\n    return 42\n")
    np.save(tmp_path / "inputs.npy", np.zeros((4, 3), dtype=np.float32))
    result = _run(
        [sys.executable, "-m", "fhe_backend.cli", "explain", "bad_factory:build", "--inputset", "inputs.npy"],
        tmp_path,
        PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not an nn.Module" in result.stderr


def test_cli_unknown_command_fails(tmp_path):
    """An unknown subcommand is an argparse error (status 2)."""
    assert _run([sys.executable, "-m", "fhe_backend.cli", "no-such-command"], tmp_path).returncode == 2


@pytest.mark.parametrize("thread", ["main", "worker"])
def test_a_write_to_a_closed_pipe_after_simulate_raises_instead_of_ending_the_process(tmp_path, thread):
    """Concrete's dataflow runtime, started by a simulation, handles SIGPIPE by ending the
    process; after a simulation through the backend, Python's behaviour is back: the write
    raises BrokenPipeError and the script keeps its own status. Also when the model was
    compiled and run in a worker thread (a web server's thread pool): there Concrete 2.11 could
    not even trace a circuit, and Python's `signal` cannot set a handler."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent("""
            import subprocess, sys, threading
            import torch
            from tests.harness import compile_fhe

            def compile_and_run():
                model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()).eval()
                compiled = compile_fhe(model, torch.randn(50, 2), n_bits=3, fhe="simulate")
                with torch.no_grad():
                    outputs.append(compiled(torch.randn(2, 2)))

            outputs = []
            if sys.argv[1] == "main":
                compile_and_run()
            else:
                worker = threading.Thread(target=compile_and_run)
                worker.start()
                worker.join()
            assert len(outputs) == 1 and outputs[0].shape == (2, 3), "the model did not run"
            reader = subprocess.Popen(["true"], stdin=subprocess.PIPE)
            reader.wait()
            try:
                reader.stdin.write(b"x" * 200000)
                reader.stdin.flush()
            except BrokenPipeError:
                sys.exit(3)
            sys.exit(4)
        """)
    )
    result = _run([sys.executable, str(script), thread], tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr[-2000:]
