"""Synthetic data: a random adult abdomen (``anatomy``) and the multi-site phantom CT generator (``phantoms``).
May import ``data``, ``errors`` and ``console``."""
