"""Training system: trains models and publishes them as versions in a model repository."""
