"""Hydra multirun support: run names that carry the swept values, the sweep summary."""
