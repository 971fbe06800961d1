"""The one exception type users see for bad input.

Everything the user can get wrong (a prompt, a flag, a file, a device) raises
:class:`GPT2FnError` with a single line that says what is wrong and what to do.
The CLI prints that line and exits with status 2; library callers can catch it.
"""


class GPT2FnError(ValueError):
    """Bad input: the message is one line, says what is wrong and what to do."""
