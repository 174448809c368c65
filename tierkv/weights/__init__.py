"""Weights that do not stay on the GPU: streamed layers (stream.py). The planner (tierkv/plan/) decides which."""
