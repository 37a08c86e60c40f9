"""``cheers serve``: an OpenAI-compatible HTTP server (chat with images, image generation and
editing) with request batching, and a web page. ``create_app(pipe, ServeConfig())`` builds it."""

from cheers.serve.app import create_app
from cheers.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
