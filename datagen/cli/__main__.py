"""`python -m datagen.cli`: the `datagen` command."""

from datagen.cli.app import main

main()
