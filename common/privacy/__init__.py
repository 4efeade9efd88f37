"""Differential privacy at a site: the federation's privacy settings (``config``, pydantic only: the wire contract
carries them), the RDP accountant (``accounting``), Poisson sampling of cases (``sampling``) and patient-level DP-SGD
with Opacus (``dpsgd``). May import ``nn``, ``data``, ``engine`` and ``errors``."""
