"""Using a trained model (trained/): predicting on files with Grad-CAM maps, exporting it, and
noticing inputs it saw in training."""
