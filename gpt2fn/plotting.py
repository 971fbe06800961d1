"""matplotlib is an optional extra (``pip install -e ".[plot]"``): scripts ask
for pyplot here and skip their plot, saying so, when it is not installed."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (with a message)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed, no plot written (pip install -e ".[plot]")')
        return None
    return plt
