"""Shared code for the pipeline stages: CLI, templates, data, encoding, artifacts."""
