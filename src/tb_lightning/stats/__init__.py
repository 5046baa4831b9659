"""Pure numbers of binary classification: weighted metrics, bootstrap intervals, operating
thresholds, temperature calibration. No torch, no files: the modules above call them."""
