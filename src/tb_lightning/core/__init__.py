"""Shared utilities every layer may use: errors, atomic writes, labels, signals, task helpers."""
