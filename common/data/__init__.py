"""Data: volume IO (NIfTI/DICOM), dataset layouts, label manifests (``manifests/*.toml``), site checks,
preprocessing with its on-disk site cache, patch sampling and augmentation. May import ``errors`` and ``console``."""
