"""The browser UI (Gradio), mounted at ``/ui/`` on the API's app by :func:`mount_ui`."""

from thai_ui.mount import mount_ui

__all__ = ["mount_ui"]
