"""User-facing errors.

Anything caused by bad user input (a file, a config, a request) raises `UserError` with one
sentence that names the input and the fix. The CLI prints it without a traceback and exits 2.
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is shown as-is, without a traceback."""

    exit_code = 2
