"""Thai LLM serving: one ASGI app with an OpenAI-compatible API and a Gradio UI."""

__version__ = "0.1.0"
