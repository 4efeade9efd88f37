"""Process management for ``fed-server``: the SuperLink, submitting and following a run, run folders, the demo.
May import ``fedseg.common`` (never ``common.cli``), ``server.config`` and ``server.run.history``."""
