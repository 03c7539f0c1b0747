"""Command-line interface: one module per command; the only package that prints."""
