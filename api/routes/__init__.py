"""Thin HTTP routers: parse, call :class:`api.serving.Serving`, return data."""
