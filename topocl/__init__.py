"""TopoCL: does a sparse-attention topology with asymmetric continual fine-tuning forget less?"""

__version__ = "0.1.0"
