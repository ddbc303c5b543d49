"""Data loading, splitting, augmentation and synthetic data."""
