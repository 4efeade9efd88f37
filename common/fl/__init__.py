"""Federated wire contract: what a train message carries (``protocol``) and model weights <-> Flower arrays
(``weights``). May import ``nn``, ``data``, ``engine.config``, ``privacy.config`` and ``errors``; never the training
loop."""
