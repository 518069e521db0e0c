"""``python -m visionautoml``: the same command line as the ``visionautoml`` script."""

from visionautoml.cli import main

main()
