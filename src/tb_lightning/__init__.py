"""tb-lightning: train and evaluate tuberculosis detectors on chest X-rays."""

__version__ = "0.1.0"
