"""Integrations with other training frameworks (see docs/integrations.md).

Import the submodule you need; this package imports nothing else:

- ``batchlab.integrations.accelerate``: ``executable_batch_size`` (also ``batchlab.executable_batch_size``),
  Accelerate's calling convention; needs nothing beyond batchlab.
- ``batchlab.integrations.huggingface``: ``GradientNoiseScaleCallback`` for ``transformers.Trainer`` and
  ``suggest_for_trainer`` (``pip install 'batchlab[hf]'``).
- ``batchlab.integrations.lightning``: ``BatchSizeTuner`` and ``GradientNoiseScaleCallback``
  (``pip install 'batchlab[lightning]'``).
"""
