"""Acceptance and retention: events from editors, joined to completions, stored for real."""
