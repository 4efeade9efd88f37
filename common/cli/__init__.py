"""The ``fed-eval`` command line (one module per command, ``main`` puts them together) and the edge helpers all
three CLIs share (``shell``: error mapping and value parsers; ``logs``: logging set-up). The only package that
imports Typer; nothing outside a CLI package imports it."""
