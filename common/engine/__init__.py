"""Training engine: training configuration, device and autocast policy, the training loop, sliding-window
inference, validation and checkpoints. May import ``nn``, ``data``, ``eval.metrics``, ``errors`` and ``console``;
never matplotlib or Typer (every site round imports it)."""
