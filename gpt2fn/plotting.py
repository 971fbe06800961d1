"""matplotlib is an optional extra (``pip install -e ".[plot]"``): scripts ask
for pyplot here. :func:`pyplot` skips a plot that is a side product, saying
so; :func:`require_pyplot` refuses, before any work, a run whose point is a plot."""

from __future__ import annotations

import os
from pathlib import Path

from gpt2fn.errors import GPT2FnError
from gpt2fn.files import atomic_write

INSTALL = 'pip install -e ".[plot]"'


def _import_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (with a message)."""
    try:
        return _import_pyplot()
    except ImportError:
        print(f"matplotlib is not installed, no plot written ({INSTALL})")
        return None


def require_pyplot(flag: str = "plotting"):
    """matplotlib.pyplot with the Agg backend, or one line saying how to install it."""
    try:
        return _import_pyplot()
    except ImportError:
        raise GPT2FnError(f"{flag} needs matplotlib, which is not installed; {INSTALL}") from None


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG atomically (directories created as needed), close it, and say so."""
    path = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    fig.clf()
    _import_pyplot().close(fig)
    print(f"wrote {path}")
    return path
