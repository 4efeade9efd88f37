"""The ``fed-server`` command line: ``start``, ``demo`` and the live round table. The only server package that
imports Typer."""
