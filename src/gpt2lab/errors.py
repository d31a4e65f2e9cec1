"""Errors meant for the person at the keyboard.

Raise `UserError` with one line that says what is wrong and how to fix it (file, line, field).
The CLI prints it without a traceback and exits with status 2.
"""


class UserError(Exception):
    """A problem with the user's input (file, config, arguments), reported as one line."""
