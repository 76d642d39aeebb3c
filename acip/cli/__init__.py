"""Hydra / command-line entry points (``python -m acip.compress``, ``python -m acip.export``)."""
