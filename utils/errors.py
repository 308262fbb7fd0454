"""The errors a user can fix: printed as one message (no traceback) with a distinct exit code."""

from __future__ import annotations


class SuiteError(Exception):
    """An error the user can fix (bad input, bad flag, missing file). Printed without a traceback."""

    exit_code = 1


class UsageError(SuiteError):
    """Bad command-line arguments. Exit code 2, like argparse."""

    exit_code = 2
