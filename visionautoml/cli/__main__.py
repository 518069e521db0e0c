"""``python -m visionautoml.cli``: the same command line as the ``visionautoml`` script."""

from visionautoml.cli import main

main()
