"""Evaluation: spacing-aware metrics (Dice, HD95, ASSD), scoring folders of predictions, attention figures.
May import ``data``, ``errors`` and ``console``; matplotlib is imported only by ``attention_export``."""
