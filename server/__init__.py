"""fedseg server side, from the command line inwards.

* ``cli``: ``fed-server start`` / ``demo`` and the live round table.
* ``control``: the processes ``fed-server`` drives: SuperLink, the run submitted with ``flwr run``, run folders,
  the demo federation.
* ``config``: the validated ``ServerConfig`` and the ``RunSpec`` handed to the ServerApp.
* ``app``: the ServerApp (``fedseg.server.app:app``).
* ``run``: what the ServerApp does each round: strategy, central validation, checkpoints, history.
"""
