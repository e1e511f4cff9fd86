"""The python tool: code runs and prints; runaway code is stopped by its limits; no network, no new processes."""

from __future__ import annotations

import asyncio
import time

from specrelay.services.toolcoord.tools.python_tool import PythonLimits, network_isolation, run_python

FAST = PythonLimits(timeout_s=3.0, cpu_s=1, memory_bytes=256 * 2**20, file_bytes=64 * 1024, max_output_chars=2000)


async def test_code_runs_and_its_output_comes_back():
    result = await run_python("import math\nprint(math.factorial(10))\nprint('to stderr', file=__import__('sys').stderr)",
                              FAST)
    assert not result.is_error
    assert result.content == "3628800\n[stderr]\nto stderr"


async def test_an_exception_is_an_error_result_with_its_traceback():
    result = await run_python("raise ValueError('boom')", FAST)
    assert result.is_error and "ValueError: boom" in result.content and result.content.endswith("[exit status 1]")


async def test_cpu_runaway_is_killed_by_the_cpu_limit():
    # A generous wall clock: on a loaded machine one CPU-second can take several seconds of wall time.
    result = await run_python("while True:\n    pass", PythonLimits(timeout_s=60.0, cpu_s=1))
    assert result.is_error and result.content == "[killed: CPU limit of 1 s]"


async def test_sleeping_code_is_killed_by_the_wall_clock_and_keeps_its_output():
    limits = PythonLimits(timeout_s=1.0, cpu_s=5)
    started = time.monotonic()
    result = await run_python("import os, time\nprint('started', flush=True)\nos.close(1)\ntime.sleep(60)", limits)
    assert time.monotonic() - started < 5
    assert result.is_error and result.content == "started\n[killed: wall-clock limit of 1 s]"


async def test_memory_and_file_limits():
    memory = await run_python("x = bytearray(1024 * 2**20)", FAST)
    assert memory.is_error and "MemoryError" in memory.content
    big_file = await run_python("open('f', 'wb').write(b'x' * 2**20)", FAST)
    assert big_file.is_error and "File too large" in big_file.content


async def test_no_new_processes_and_no_way_around_the_limits():
    for code in ("import os; os.fork()", "import os; os.system('echo hi')", "import subprocess",
                 "import ctypes", "import resource; resource.setrlimit(resource.RLIMIT_CPU, (100, 100))"):
        result = await run_python(code, FAST)
        assert result.is_error and "sandbox:" in result.content, code
        assert "hi" not in result.content.splitlines()


async def test_no_network_even_to_a_listening_local_port():
    accepted = []
    server = await asyncio.start_server(lambda r, w: (accepted.append(1), w.close()), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    code = f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    async with server:
        result = await run_python(code, FAST)
        await asyncio.sleep(0.1)
    assert result.is_error and "connected" not in result.content.splitlines()
    assert accepted == []
    assert network_isolation() in ("namespace", "audit-hook")


async def test_output_is_cut_at_the_limit():
    result = await run_python("print('a' * 100000)", FAST)
    assert not result.is_error
    assert result.content.startswith("a" * 2000) and result.content.endswith("[... output cut: 100001 bytes in all]")
    assert len(result.content) < 2100


async def test_the_interpreter_is_isolated():
    result = await run_python("import sys, os\nprint(sys.flags.isolated, sorted(os.listdir('.')))", FAST)
    assert result.content == "1 []"
