"""``python -m node`` runs the segnode CLI."""

from node.cli import main

main()
