"""Integrations with other training frameworks, each an optional extra.

Import the submodule you need: ``from batchlab.integrations.lightning import GradientNoiseScaleCallback``
(``pip install 'batchlab[lightning]'``). This package imports nothing else.
"""
