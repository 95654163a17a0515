"""Celery tasks: thin wrappers around the domain functions, built on tasks/base.py. They find
the app as Celery's current app and never import worker/, which builds it from them."""
