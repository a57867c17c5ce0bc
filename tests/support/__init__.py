"""Helpers shared by several services' tests."""
