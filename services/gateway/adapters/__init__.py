"""Outbound clients of the REST layer."""
