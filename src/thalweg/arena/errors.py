"""The one exception the arena raises for bad user input; the CLI turns it into a one-line message."""


class ArenaError(ValueError):
    """Bad input to the arena (unknown task or optimizer, unwritable directory, empty budget...)."""
