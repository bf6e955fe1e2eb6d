"""retrotune: retrieval-augmented fine-tuning, RETRO vs GPT with prepended neighbours, side by side.

This package composes the stages into runs and experiments; every stage may use its QA data (`retrotune.qa`) and
answer metrics (`retrotune.metrics`). Model resolution is the ground-floor package `backbones`.
"""
__version__ = "0.1.0"
