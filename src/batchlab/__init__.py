"""batchlab: measure batch size and normalization choices for PyTorch models."""

__version__ = "0.1.0"
