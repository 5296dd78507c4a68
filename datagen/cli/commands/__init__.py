"""One module per CLI area; datagen/cli/app.py composes them."""
