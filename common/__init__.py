"""Shared core of fedseg: model, loss, metrics, data IO and training, used by both server and sites."""
