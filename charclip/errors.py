"""The one exception type that reaches the user as a single line."""


class CharclipError(Exception):
    """A problem with the user's input, reported as one line and a non-zero exit.

    The message says what was wrong and what to do about it; the CLI prints it
    without a traceback.
    """
