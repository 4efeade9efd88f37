"""Networks and losses: the paper's AttentionUNet3D and UNet3D, their building blocks, a parameter/FLOP summary,
and the (partial-label) Dice loss. May import torch and ``fedseg.common.errors`` only."""
