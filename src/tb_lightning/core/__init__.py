"""Shared utilities every layer may use: errors, atomic writes, labels, signals, task helpers."""

from pathlib import Path

# The checkout this code runs from: the package is installed editable (`make install`), so the
# project root is three levels above src/tb_lightning/core/. config re-exports it (CONF_DIR).
PROJECT_ROOT = Path(__file__).resolve().parents[3]
