"""cmgems: pretraining DNA language models with adaptive PMI masking (CM-GEMS)."""

__version__ = "0.1.0"
