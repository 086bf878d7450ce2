"""User-facing errors: one line naming the problem and the fix; the CLI maps them to exit code 2."""


class FmaskError(Exception):
    """A problem with the user's input or files, not a bug in fmask.

    The message is a single line that says what is wrong and how to fix it.
    """
