"""Scripts run as separate processes without paying the imports each time.

A fresh interpreter spends about 8 s of CPU importing torch, transformers, torchvision (through transformers' image
utilities), scikit-learn and this package before `scripts/train.py` does anything; the kill test starts a dozen
runs. Here each run is a process forked from a multiprocessing fork server that imported all that once and has
run nothing: a real process of its own (its pid, its memory, killed by SIGKILL like any other) that executes the
script's file as `__main__` with the given arguments, its stdout and stderr written to files. What the fork server
skips is only the interpreter's start-up, which the tests that call the command line as a subprocess still cover.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_CONTEXT = multiprocessing.get_context("forkserver")
# imported by the server before it forks anything (this module, so that a child unpickles its target for free)
_CONTEXT.set_forkserver_preload(["vivit_medmnist.train", "forked_runs"])


def _run_script(argv: list[str], env: dict[str, str], stdout: str, stderr: str) -> None:
    os.chdir(REPO)
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


class ForkedRun:
    """`subprocess.Popen`'s interface where the tests need it: `wait`, `send_signal`, `communicate`, `returncode`
    (negative: the signal that ended it)."""

    def __init__(self, argv: list[str], logs: Path, env: dict[str, str] | None = None):
        """Runs `argv[0]` (a script's path) with `argv`; its stdout and stderr go to `logs`.out and `logs`.err."""
        self._out, self._err = logs.with_suffix(".out"), logs.with_suffix(".err")
        self._process = _CONTEXT.Process(
            target=_run_script, args=(argv, env or {}, str(self._out), str(self._err))
        )
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self._process), timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signum)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._out.read_text(errors="replace"), self._err.read_text(errors="replace")


def run_forked(argv: list[str], logs: Path, timeout: float, env: dict[str, str] | None = None):
    """`subprocess.run(argv, capture_output=True, text=True)` for a Python script `argv[0]`, forked as above."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    run = ForkedRun([str(arg) for arg in argv], logs, env)
    try:
        stdout, stderr = run.communicate(timeout)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(argv, run.returncode, stdout, stderr)
