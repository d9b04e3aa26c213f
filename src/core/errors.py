"""Errors a user can fix, said in one line."""


class UserError(Exception):
    """A problem the user can fix (bad param, bad file). Printed as one line, no traceback."""


def first_line(error, limit=200):
    """An exception as one short line for a message: its first non-empty line, or its type's name
    when it says nothing (`str(e)` can be empty)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]
