"""Celery tasks: thin wrappers that open a session and call the domain functions."""
