"""ASGI entry point for servers started with an import string (several workers)."""

from parcours.web.app import create_app

app = create_app()
