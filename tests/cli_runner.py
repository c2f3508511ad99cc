"""`posttrain ARGV` run in the test's process, as the walkthrough tests drive the CLI."""

from __future__ import annotations

import pytest

from posttrain import cli


def run_cli(capsys, *argv) -> tuple[int, str]:
    """posttrain ARGV in this process; (exit code, stderr + stdout). argparse's exit is a code; an
    exception that escapes `cli.main` is a traceback the user would see, and fails the test."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    except Exception as exc:  # noqa: BLE001
        captured = capsys.readouterr()
        pytest.fail(f"traceback instead of a one-line error: {type(exc).__name__}: {exc}\n{captured.err[-500:]}")
    captured = capsys.readouterr()
    return rc, captured.err + captured.out
