"""A test module's long, independent computations, run side by side in worker processes.

The suite runs in one process on one torch thread, so on a 2-core machine one core idles through the long CPU-bound
checks (20,000 seeded samples per proposer, 50 prompts × 128 tokens per proposer and batch size). Such a module
submits each computation here when it starts; each test then waits for its own result and asserts on it exactly as
it did when it computed the result itself. The computation is the same code on the same inputs, on one torch thread
as in the suite, so its result is the same.

A worker is a fresh `python -c` that calls a module-level function by name. Arguments and result cross as JSON in
files (nothing is unpickled); a worker that fails gives its test the worker's traceback.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the `specrelay` package

_WORKER = """
import ctypes, importlib, json, os, signal, sys
module, function, args_path, result_path, parent = sys.argv[1:]
if sys.platform == "linux":  # PR_SET_PDEATHSIG: a killed test run takes its workers with it
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != int(parent):
        sys.exit("the test run that started this worker is gone")
import torch
torch.set_num_threads(1)  # as tests/conftest.py sets it for the suite
result = getattr(importlib.import_module(module), function)(*json.loads(open(args_path).read()))
with open(result_path, "w") as f:
    json.dump(result, f)
"""


class Workers:
    """One worker process per core at most. `submit(function, *args)` -> Future of function(*args)."""

    def __init__(self, max_workers: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers or len(os.sched_getaffinity(0)))
        self._dir = tempfile.TemporaryDirectory(prefix="specrelay-test-workers-")
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()  # no worker starts once close() has begun
        self._closed = False
        self._count = 0

    def submit(self, function, *args) -> Future:
        self._count += 1
        return self._pool.submit(self._run, self._count, _module_name(function), function.__name__, args)

    def close(self) -> None:
        """Drop what has not started, stop what runs (a test run that was interrupted or deselected the rest)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._closed = True
            for proc in self._procs:
                proc.kill()
        self._pool.shutdown(wait=True)
        self._dir.cleanup()

    def _run(self, n: int, module: str, function: str, args: tuple):
        base = Path(self._dir.name) / str(n)
        args_path, result_path, log_path = (base.with_suffix(s) for s in (".args.json", ".result.json", ".log"))
        args_path.write_text(json.dumps(list(args)))
        with open(log_path, "w") as log:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the workers were closed")
                proc = subprocess.Popen([sys.executable, "-c", _WORKER, module, function, str(args_path),
                                         str(result_path), str(os.getpid())],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                self._procs.add(proc)
            rc = proc.wait()
            with self._lock:
                self._procs.discard(proc)
        if rc != 0:
            raise RuntimeError(f"worker {module}.{function}{tuple(args)} exited with {rc}:\n"
                               + log_path.read_text()[-6000:])
        return json.loads(result_path.read_text())


def _module_name(function) -> str:
    """The importable name of the function's module, from its file (pytest may import test modules under others)."""
    installed = Path(importlib.util.find_spec("specrelay").origin).resolve().parent
    if installed != ROOT:  # a worker would run that checkout's tests, not these
        raise RuntimeError(f"`specrelay` is installed from {installed}, these tests are {ROOT}'s: `make setup` here")
    path = Path(inspect.getfile(function)).resolve().relative_to(ROOT).with_suffix("")
    return ".".join(("specrelay", *path.parts))
