"""The base of the package: the error a user's input causes, and how it reads on one line.

Every stage raises `UserError` where it checks an input (a flag, a config value, a file),
with a message that names the input and what was expected. The console scripts
(sabr_jax.cli) print such an error as one line; this module imports nothing else.
"""


class UserError(Exception):
    """An error caused by the input (a flag, a config value, an input file); its message names it."""


def one_line(error: BaseException) -> str:
    """An error's message on one line: its first line, and its last too when it spans more
    (the error at the end of a traceback the message holds)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
