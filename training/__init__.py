"""Training pipeline: data, features cache, training loop and evaluation."""
