"""``python -m zmqrun`` runs the CLI (same as the ``zmqrun`` command)."""

from .cli import main

main()
