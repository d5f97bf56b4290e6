"""``python -m twostage`` runs the command line."""

from twostage.cli import main

main()
