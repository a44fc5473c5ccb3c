"""Errors a user can cause. The CLI turns them into a one-paragraph message and exit code 2."""


class UserError(Exception):
    """A problem the user can fix: bad path, bad YAML, missing weights offline, NaN loss, ...

    The message must name the cause and the fix.
    """

    exit_code = 2
