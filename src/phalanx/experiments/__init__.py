"""Experiments: paper recipes, reports and plots built on the training stack (never imported by
core code)."""
