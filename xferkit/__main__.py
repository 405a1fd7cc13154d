"""``python -m xferkit``: the command line (also what ``torchrun -m xferkit`` runs)."""

from xferkit.cli import app

app()
