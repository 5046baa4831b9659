"""Running a trained model: loading checkpoints, predicting, exporting, saliency, features."""
