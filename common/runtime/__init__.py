"""Process runtime shared by ``fed-server`` and ``fed-client``: supervised child processes, the ``flwr`` command
line, per-app log files. May import ``errors`` only."""
