"""Shared test helpers: models, inputs, launch helpers. No test module imports another test module."""
