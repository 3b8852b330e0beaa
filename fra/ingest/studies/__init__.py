"""Reproducible studies built on the decomposition (`fra report <study>`)."""
