"""chainopt: tune DSPy programs on local llama.cpp models for the lowest cost per successful chain."""

__version__ = "0.1.0"
