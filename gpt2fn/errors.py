"""The one exception type users see for bad input, the checks that raise it,
and the scripts' argument parser.

Everything the user can get wrong (a prompt, a flag, a file, a device) raises
:class:`GPT2FnError` with a single line that says what is wrong and what to do.
The CLI prints that line and exits with status 2; library callers can catch it.

The checks below only look: none of them creates, truncates or writes
anything, so a run refused at the start leaves the file system as it was.
"""

from __future__ import annotations

import argparse
import math
import os
import select
import sys
from pathlib import Path


class GPT2FnError(ValueError):
    """Bad input: the message is one line, says what is wrong and what to do."""


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is running out of memory: Python's ``MemoryError``, or
    torch's on the CPU ("can't allocate memory") or a GPU
    (``torch.OutOfMemoryError``: "CUDA out of memory")."""
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "can't allocate memory")))


def run_cli(run, *args) -> int:
    """Call a script's ``run(*args)``: bad input prints one ``error: ...``
    line on stderr and returns exit status 2; so does a file-system error on a
    path the user gave (permission denied, not a directory, disk full);
    Ctrl-C returns 130 quietly, and so does a reader of stdout that went away
    (``| head``) with 141, as Unix tools stop on SIGPIPE."""
    try:
        return run(*args)
    except GPT2FnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError as e:
        if not _stdout_gone():
            return _os_error(e)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush then has nowhere to fail
        return 141
    except OSError as e:
        return _os_error(e)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _os_error(e: OSError) -> int:
    where = f" ({e.filename})" if e.filename else ""
    print(f"error: {e.strerror or e}{where}", file=sys.stderr)
    return 2


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this OS, or no file behind stdout
        return False


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser for the scripts, where a long option may be spelt
    with hyphens or underscores (``--max-tokens`` or ``--max_tokens``): each
    script's ``--help`` shows one spelling, and the scripts do not all use the
    same one. ``--help`` shows each option's default (:class:`HelpFormatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        spelt = {_option_key(o): o for a in self._actions for o in a.option_strings if o.startswith("--")}
        end = args.index("--") if "--" in args else len(args)  # after "--" everything is a value
        for i, arg in enumerate(args[:end]):
            name, eq, value = arg.partition("=")
            if not name.startswith("--") or name in spelt.values():
                continue
            key = _option_key(name)  # the whole name, or (as argparse allows) a prefix of one only
            matches = [spelt[key]] if key in spelt else [o for k, o in spelt.items() if k.startswith(key)]
            if len(matches) == 1:
                args[i] = matches[0] + eq + value
        return super().parse_known_args(args, namespace)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help, unless the help speaks
    of its default itself or there is none to show (None, a flag's False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if "default" in text or default is None or default is False or default in ([], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _option_key(option: str) -> str:
    """A long option without its spelling: ``--max-tokens`` and ``--max_tokens`` -> ``max_tokens``."""
    return option[2:].replace("-", "_")


# ----------------------------------------------------------------------------- numbers


def check_int(name: str, value, low: int = 1) -> int:
    """An integer >= ``low`` (a count or a size: ``low`` is 1 unless 0 means something)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GPT2FnError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_token_ids(what: str, ids: list, vocab_size: int) -> None:
    """One clear line if ``ids`` holds anything but ids of a ``vocab_size``-token vocabulary."""
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise GPT2FnError(f"{what} holds {t!r}, which is not a token id; token ids are integers")
        if not 0 <= t < vocab_size:
            raise GPT2FnError(f"{what} holds token {t}, outside the model's vocabulary of {vocab_size} (ids 0 to "
                              f"{vocab_size - 1}); encode text with the tokenizer the model was trained with")  # fmt: skip


def check_context(length: int, n_ctx: int) -> None:
    """One clear line for a sequence longer than the model's context (the rows of its position embedding)."""
    if length > n_ctx:
        raise GPT2FnError(f"the sequence is {length} tokens but the model's context holds {n_ctx}; run it in windows "
                          f"of at most {n_ctx} tokens (gpt2fn.evaluation.perplexity does)")  # fmt: skip


def is_real(value) -> bool:
    """An int or a float (not a bool, not None, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> float:  # fmt: skip
    """A finite number in the interval from ``low`` to ``high`` (closed unless
    ``low_open`` / ``high_open``)."""
    ok = is_real(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == math.inf:
            where = f"{'>' if low_open else '>='} {low:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise GPT2FnError(f"{name} must be a finite number {where}, got {value!r}")
    return value


def parse_int_list(name: str, text: str, low: int = 1, example: str = "64,256") -> list[int]:
    """``"64,256"`` -> ``[64, 256]``, each an integer >= ``low`` (``example``: a valid list, for the error)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < low for v in values):
        raise GPT2FnError(f"{name} must be a comma-separated list of integers >= {low} (e.g. {example}), got {text!r}")
    return values


# ----------------------------------------------------------------------------- paths


def check_input(path: str | os.PathLike, what: str = "file", directory: bool = False) -> Path:
    """An existing, readable file (or directory)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise GPT2FnError(f"{what} {path} does not exist")
    if path.is_dir() != directory:
        raise GPT2FnError(f"{what} {path} is not a {'directory' if directory else 'file'}")
    if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
        raise GPT2FnError(f"{what} {path} is not readable (permission denied)")
    return path


def read_utf8(path: str | os.PathLike, what: str = "file") -> str:
    """A text file's contents, or one line saying that the ``what`` (e.g.
    "prompt file", or the flag that named it) cannot be read or is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GPT2FnError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise GPT2FnError(f"cannot read {what} {path} ({e.strerror or e})") from None


def _check_creatable(path: Path, what: str) -> None:
    """``path`` (absent) could be made: its nearest existing ancestor is a
    writable directory."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GPT2FnError(f"cannot create {what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GPT2FnError(f"cannot create {what} {path}: {parent} is not writable (permission denied)")


def check_output_file(path: str | os.PathLike, what: str = "output file", suffix: str | None = None) -> Path:
    """A file that can be written (created with its directories, or replaced);
    nothing is created now."""
    path = Path(path).expanduser()
    if suffix is not None and path.suffix != suffix:
        raise GPT2FnError(f"{what} {path} must end in {suffix}")
    if path.is_dir():
        raise GPT2FnError(f"{what} {path} is a directory; give a file name")
    if path.exists():
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise GPT2FnError(f"cannot write {what} {path}: {path.parent} is not writable (permission denied)")
    else:
        _check_creatable(path, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """A directory that exists and is writable, or can be created; nothing is created now."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GPT2FnError(f"{what} {path} is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise GPT2FnError(f"{what} {path} is not writable (permission denied)")
    else:
        _check_creatable(path, what)
    return path
