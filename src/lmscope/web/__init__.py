"""The local atlas explorer: a FastAPI app with a JSON API and server-rendered pages."""

from lmscope.web.app import Live, create_app

__all__ = ["Live", "create_app"]
