"""Hugging Face Spaces hardware check: ZeroGPU cannot drive this app's engine.

``spaces.GPU`` (package ``spaces``) only works for Gradio apps started with
``Blocks.launch``: its start-up step (packing the CPU weights and reporting to
the ZeroGPU device API) is installed by wrapping ``gr.Blocks.launch``, which
``mount_gradio_app`` under uvicorn never calls. Beyond that, a decorated
function runs each call in a *forked* child that holds the GPU only for that
call (coroutines are refused), while this app's engine is one long-lived
worker thread that batches UI and API requests together on a device it owns.
docs/ui.md's "Hugging Face Spaces" section has the details; here the server
only says so in its log, because on ZeroGPU the model silently runs on CPU.
"""

from __future__ import annotations

import logging
import os

ZERO_GPU_ENV = "SPACES_ZERO_GPU"


def running_on_zero_gpu(environ: dict[str, str] | None = None) -> bool:
    value = (environ if environ is not None else os.environ).get(ZERO_GPU_ENV, "")
    return value.lower() in ("1", "t", "true")


def warn_if_zero_gpu(log: logging.Logger, environ: dict[str, str] | None = None) -> bool:
    if not running_on_zero_gpu(environ):
        return False
    log.warning("this Space runs on ZeroGPU hardware, which this app cannot use (spaces.GPU needs "
                "Blocks.launch and a per-call forked worker; this app mounts Gradio on FastAPI and "
                "keeps one batching engine): the model runs on the CPU. Pick dedicated GPU "
                "hardware (e.g. Nvidia T4/L4) in the Space settings.")
    return True
