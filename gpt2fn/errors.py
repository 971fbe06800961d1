"""The one exception type users see for bad input.

Everything the user can get wrong (a prompt, a flag, a file, a device) raises
:class:`GPT2FnError` with a single line that says what is wrong and what to do.
The CLI prints that line and exits with status 2; library callers can catch it.
"""


class GPT2FnError(ValueError):
    """Bad input: the message is one line, says what is wrong and what to do."""


def run_cli(run, *args) -> int:
    """Call a script's ``run(*args)``: bad input prints one ``error: ...``
    line on stderr and returns exit status 2; Ctrl-C returns 130 quietly."""
    import sys

    try:
        return run(*args)
    except GPT2FnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
