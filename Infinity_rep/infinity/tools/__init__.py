"""Maintenance scripts of the infinity package (asset builders)."""
