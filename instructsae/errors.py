"""The one exception type that reaches the user as a single line (the CLI prints it, no traceback)."""


class UserError(Exception):
    """Bad input or a state the user can fix: the message names what is wrong and where."""


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type's name when the message is empty
    (many library errors carry several lines, and some none at all)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
