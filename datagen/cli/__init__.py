"""The top layer: the `datagen` command (app.py), its shared options (options.py) and one module per area
(commands/). Each command builds a config from its flags, calls one library function (datagen/runs.py and the
modules it names), and prints the summary; nothing below this package imports it."""

from datagen.cli.app import app, main

__all__ = ["app", "main"]
