"""datagen: generate instruction-tuning data with language models, filter it, store it, train on it."""

__version__ = "0.1.0"
