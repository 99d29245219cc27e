"""Deployment targets: what a runtime and device support and prefer; compile and profile."""
