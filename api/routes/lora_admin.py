"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes and bodies).

They change what the server runs, so they take an admin key (``THAI_ADMIN_KEYS``, a
bearer token) that ordinary API keys are not; with none configured the routes do not
exist (404). Only folders under ``THAI_LORA_ROOT`` are read. How an adapter is checked
and applied is the engine's business (:mod:`api.engine.lora`).
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from api.errors import APIError, InvalidRequestError
from api.protocol import ErrorResponse
from api.protocol_lora import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

log = logging.getLogger("thai.api.admin")
router = APIRouter()
# The answer is plain text (vLLM's), its errors the JSON envelope: a ``model`` here would be
# documented under the route's text/plain, so the errors name their JSON schema themselves.
ERRORS = {code: {"content": {"application/json": {"schema": {
    "$ref": f"#/components/schemas/{ErrorResponse.__name__}"}}}}
    for code in (400, 401, 403, 404, 409, 503)}


class AdminRouteOffError(APIError):
    status_code = 404
    error_type = "not_found_error"


class AdminKeyError(APIError):
    status_code = 401


class LoraRootError(APIError):
    status_code = 403
    error_type = "permission_error"


def require_admin(request: Request) -> None:
    """The bearer token must be one of THAI_ADMIN_KEYS (compared in constant time)."""
    keys = request.app.state.settings.server.admin_keys
    if not keys:
        raise AdminRouteOffError("adapter administration is off: set THAI_ADMIN_KEYS to enable it",
                                 code="admin_routes_off")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys) or not token:
        log.warning("refused an adapter admin request: %s admin key", "wrong" if token else "no")
        raise AdminKeyError("this route needs an admin key (THAI_ADMIN_KEYS) as "
                            "'Authorization: Bearer KEY'; API keys are not admin keys",
                            code="invalid_admin_key" if token else "missing_admin_key")


def adapter_folder(request: Request, lora_path: str) -> str:
    """``lora_path`` resolved (links followed), refused unless it lies under THAI_LORA_ROOT."""
    root_setting = request.app.state.settings.model.lora_root
    if not root_setting:
        raise LoraRootError("loading adapters at run time is off: set THAI_LORA_ROOT to the "
                            "folder adapters may be loaded from", code="lora_root_unset")
    root = Path(root_setting).expanduser().resolve()
    try:
        folder = (root / Path(lora_path).expanduser()).resolve()
    except (OSError, RuntimeError, ValueError):
        raise InvalidRequestError("lora_path is not a usable path", param="lora_path") from None
    if folder == root or not folder.is_relative_to(root):
        raise LoraRootError("lora_path must be a folder under THAI_LORA_ROOT",
                            param="lora_path", code="lora_path_outside_root")
    return str(folder)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERRORS,
             summary="Load a LoRA adapter as a model (vLLM; admin key)")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """Checked (safetensors only; rank, target modules, shapes and base against the loaded
    base) before it serves anything; requests on other models are not interrupted."""
    require_admin(request)
    folder = adapter_folder(request, body.lora_path)
    await request.app.state.engine.load_adapter(body.lora_name, folder)
    log.info("LoRA adapter %s loaded by an admin", body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERRORS,
             summary="Unload a LoRA adapter (vLLM; admin key)")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest,
                              request: Request) -> PlainTextResponse:
    """Refused (409) while requests use the adapter: they are never broken."""
    require_admin(request)
    await request.app.state.engine.unload_adapter(body.lora_name)
    log.info("LoRA adapter %s unloaded by an admin", body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
