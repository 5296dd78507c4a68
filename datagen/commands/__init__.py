"""One module per CLI area; datagen/cli.py composes them."""
