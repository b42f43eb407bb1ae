"""An experiment's output folder: the table (JSON and Markdown, printed too) and its PNG figures.

The folder must not exist or be empty; one holding files is refused unless ``overwrite``, and then
only the files this experiment writes are replaced (a user's other files stay).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..files import atomic_write, is_writable

__all__ = ["prepare_out", "write_table", "markdown_table", "new_figure", "save_figure", "fmt"]


def prepare_out(out, overwrite):
    """Check out before any work: absent, empty, or (with overwrite) any folder; ValueError otherwise.
    It is created only when the results are written (a failed experiment leaves no folder)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} already holds files: pass --overwrite to replace the experiment's table "
                         "and figures there, or choose another --out")
    if out.is_dir() and not is_writable(out):
        raise ValueError(f"--out {out} is not writable")
    return out


def fmt(value, digits=3):
    """A table cell: '-' for a missing value (None), else the number rounded."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def markdown_table(columns, rows):
    """Markdown of rows (lists of cells) under the column names."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(out, result, markdown, log=print):
    """table.json (result) and table.md (markdown), both atomically; print the Markdown."""
    out = Path(out)
    atomic_write(out / "table.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    atomic_write(out / "table.md", lambda f: f.write((markdown + "\n").encode()))
    log(markdown)
    log(f"wrote {out / 'table.json'}, {out / 'table.md'} and the figures {', '.join(result.get('figures', []))}")


def new_figure(rows=1, cols=1, size=(4.2, 3.4)):
    """(figure, axes array) drawn on the Agg canvas, independent of pyplot's state."""
    fig = Figure(figsize=(size[0] * cols, size[1] * rows))
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_figure(fig, out, name):
    """Save fig as out/name (PNG) atomically; returns the file name."""
    FigureCanvasAgg(fig)
    atomic_write(Path(out) / name, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    return name
