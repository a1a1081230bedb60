"""Data: tokenizers and DataModules."""
