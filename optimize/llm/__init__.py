"""Inference: local GGUF models run in-process by llama.cpp, behind DSPy's engine contract.

types (jobs, completions, the backend contract, usage, call observers), sequential and batched
backends, the DSPy engine, the cache-friendly adapter, the model registry, settings, and raw llama.cpp
helpers. Nothing here imports the pipeline above it: callers hear each call's usage through
`types.observe`.
"""
