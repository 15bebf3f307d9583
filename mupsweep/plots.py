"""matplotlib for every figure mupsweep draws, loaded on first use with the Agg backend: importing
mupsweep stays fast and a figure never needs a display."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported here, not at module import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
