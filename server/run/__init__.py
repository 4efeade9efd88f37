"""Inside the ServerApp process: the round loop, strategy selection and recording, central validation,
global checkpoints and the history files. May import ``fedseg.common`` (never ``common.cli``) and ``server.config``."""
