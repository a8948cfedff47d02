"""``python -m gradbridge``: the command line (see :mod:`gradbridge._cli.commands`)."""

from ._cli.commands import main

if __name__ == "__main__":
    main()  # click's standalone mode: prints errors and exits with the command's exit code
