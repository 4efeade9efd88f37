"""The ``fed-client`` command line: ``check`` and ``join``. The only client package that imports Typer."""
