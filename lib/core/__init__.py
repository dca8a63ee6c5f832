"""Configuration (the original ``core`` package)."""
