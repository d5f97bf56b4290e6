"""``python -m twostage`` runs the command line."""

from twostage.cli import main

if __name__ == "__main__":  # not when a spawned worker (`tune --jobs`) imports it
    main()
