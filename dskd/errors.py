"""One exception type for bad user input, so CLIs can print one line and exit 2."""


class UserError(Exception):
    """Bad input from the user: a path, a field, a flag. The message names it and the fix."""
