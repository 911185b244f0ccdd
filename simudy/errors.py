"""The one exception the stages turn into a one-line message (and exit code 2) instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input; its message is one line that names the fix."""
