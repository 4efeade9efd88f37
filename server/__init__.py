"""fedseg server side: Flower SuperLink management, aggregation strategy and central validation.

Modules, from the command line inwards:

* ``cli_start`` / ``cli_demo``: ``fed-server start`` and ``fed-server demo`` (``demo`` builds the phantom federation).
* ``federation``: SuperLink up, run submitted with ``flwr run``, followed to the end (``flwrctl``, ``superlink``).
* ``processes``: child-process supervision (process groups, SIGTERM then SIGKILL, no orphans).
* ``config`` / ``runs``: the validated ``ServerConfig``, the ``RunSpec`` passed to the ServerApp as
  ``config-json``, run folders and ``--resume``.
* ``app`` / ``rounds``: the ServerApp (``fedseg.server.app:app``) and what it does each round.
* ``strategy``: Flower strategy selection plus per-site recording; ``protocol``: the message contract shared
  with ``fedseg.client.app``; ``weights``: state dict <-> ``ArrayRecord``.
* ``evaluation``, ``checkpoints``, ``history``, ``live``: central Dice, last/best checkpoints, history files,
  the live table.
"""
