import subprocess
import sys

from specrelay import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specrelay", *args], capture_output=True, text=True, timeout=120)


def test_version_prints_the_package_version():
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"specrelay {__version__}"


def test_help_lists_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("serve",):
        assert command in out.stdout


def test_unknown_command_is_a_clear_error():
    out = run_cli("frobnicate")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
