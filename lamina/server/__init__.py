"""`lamina serve`: an OpenAI-compatible HTTP/1.1 server on the Python standard library (asyncio streams)."""
from lamina.server.app import App, ServerSettings
from lamina.server.launch import add_serve_args, run_server

__all__ = ["App", "ServerSettings", "add_serve_args", "run_server"]
