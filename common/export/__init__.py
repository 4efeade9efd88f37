"""Exporting a trained checkpoint for other runtimes: TorchScript, ONNX and a MONAI bundle, each with the contract
of what it expects written beside it and a parity check against PyTorch on a whole CT.

May import ``nn``, ``data``, ``engine``, ``eval``, ``errors`` and ``console``; ``onnx``, ``onnxruntime`` and
``onnxscript`` (the ``export`` extra) only inside the functions that need them (:mod:`.deps`).
``bundle_transforms`` is the exception to every rule here: it is copied into each bundle and imports only MONAI.
"""
