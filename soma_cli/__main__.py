"""``python -m soma_cli``: the ``soma`` command."""

from .cli import main

main()
