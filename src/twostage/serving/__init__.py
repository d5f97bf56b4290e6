"""The HTTP service: ``twostage serve models/`` (FastAPI + uvicorn).

Import :func:`create_app` and build it with :class:`ServeSettings`; nothing is loaded
until the app starts.
"""

from twostage.serving.app import ServeSettings, app_from_env, create_app
from twostage.serving.registry import ModelRegistry

__all__ = ["ModelRegistry", "ServeSettings", "app_from_env", "create_app"]
