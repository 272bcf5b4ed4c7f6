"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A problem with the user's input: the message says what, where, and what to do next.

    The CLI prints it without a traceback and exits with status 2.
    """
