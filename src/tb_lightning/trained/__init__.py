"""The trained model (one checkpoint or a k-fold folder) with its preprocessing, threshold and
temperature: what eval, predict, export and train's final scoring load and run."""
