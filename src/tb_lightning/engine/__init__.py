"""Training: fit a model as configured, then score its checkpoint once and write the report."""
