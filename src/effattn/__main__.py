"""``python -m effattn`` runs the command line."""

from effattn.cli import main

main()
