"""The one exception type that reaches the user as a single line (the CLI prints it, no traceback)."""


class UserError(Exception):
    """Bad input or a state the user can fix: the message names what is wrong and where."""
