"""Shared core of fedseg, used by both server and sites; grouped by concern, lowest layer first.

* ``errors``, ``console``: user-facing exceptions and the shared rich console (import nothing of fedseg).
* ``nn``: the networks, their summary and the Dice loss (torch only).
* ``data``: volume IO, dataset layouts, label manifests, preprocessing and its site cache, patch sampling.
* ``synthetic``: the phantom CT generator (builds on ``data``).
* ``eval``: metrics, folder scoring and attention figures (builds on ``data``).
* ``engine``: device policy, training loop, sliding-window inference, validation, checkpoints.
* ``privacy``: the federation's privacy settings, the RDP accountant and patient-level DP-SGD (Opacus).
* ``fl``: the Flower message contract and weights on the wire (no training loop).
* ``export``: TorchScript, ONNX and MONAI bundle export of a checkpoint, with its parity check.
* ``datasets``: the public-dataset registry, resumable verified fetch, safe extraction, virtual-hospital splits.
* ``runtime``: child processes, the ``flwr`` command line, app log files.
* ``cli``: the ``fed-eval`` commands and the helpers all three CLIs share (the only place Typer is used).
"""
