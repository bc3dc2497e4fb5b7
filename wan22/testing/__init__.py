"""Tiny random-weight model sets (python -m wan22.testing.tiny) and the simulated machine that the
memory tests and benchmark share."""
