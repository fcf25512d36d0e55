"""Input data: preprocessing for the frozen encoders (and, later, datasets and pipelines)."""
