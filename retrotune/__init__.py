"""retrotune: retrieval-augmented fine-tuning, RETRO vs GPT with prepended neighbours, side by side.

This package is the foundation every stage may use: model resolution (`retrotune.models`), QA data
(`retrotune.qa`) and answer metrics (`retrotune.metrics`).
"""
__version__ = "0.1.0"
