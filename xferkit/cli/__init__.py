"""The command line: typer options and rich output over the library (``xferkit.api``); no torch for --help."""

from xferkit.cli.app import app

__all__ = ["app"]
