"""The one exception type for mistakes a user can make (bad config, missing file, bad input).

The CLI prints its message as a single line and exits with code 2; library callers can catch it.
Messages say what is wrong and name the fix.
"""


class UserError(Exception):
    """A problem with the user's input or configuration, reported as one clear line."""


class Interrupted(UserError):
    """The user stopped a run (Ctrl-C): the CLI prints the line and exits with code 130."""

    exit_code = 130
    label = "interrupted"
