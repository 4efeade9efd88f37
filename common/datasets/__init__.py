"""Public CT datasets: the registry of known datasets (``registry.toml``), fetching one (resumable download,
checksum, safe extraction, arrangement into a layout fedseg reads, its ``labels.toml``) and splitting a fetched
dataset into virtual hospitals. May import ``data``, ``errors`` and ``console``."""
