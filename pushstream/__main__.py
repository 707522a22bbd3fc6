"""``python -m pushstream`` runs the command-line interface."""

from pushstream.cli import main

if __name__ == "__main__":
    main()
