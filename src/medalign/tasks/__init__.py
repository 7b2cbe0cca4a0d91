"""Tasks: each builds model + loss + metrics from a config and defines its training step.

No device code lives here; the engine moves tensors and runs the loop.
"""
