"""The model status banner at the top of the UI.

People must see at a glance whether the model is still loading, ready (which
model, on which device), failed, or only the offline demo checkpoint, whose
random weights produce meaningless text.

The UI is public unless ``THAI_PROTECT_UI`` is set, so the banner shows what
``/health`` shows anyone: the served model's name, device and dtype, the base
model only when it is a hub id, whether an adapter is applied, and load errors
with server paths removed (:mod:`api.serving`'s public view).
"""

from __future__ import annotations

import html

from api.engine import Engine, EngineState
from api.serving import public_base_model, public_failure


def status_html(engine: Engine) -> str:
    """The banner: what an analyst needs in plain Thai and English; the engineering detail
    (dtype, quantization and why) in a tooltip, and in full at ``/health``."""
    info = engine.info
    state = engine.current_state()
    name = html.escape(info.model_name)
    if state is EngineState.LOADING:
        return _banner("loading", f"กำลังโหลดโมเดล <b>{name}</b>… / Loading the model…")
    if state is EngineState.READY:
        quantized = info.quantization_reason if info.quantization not in (None, "none") else None
        details = _details(" · ".join(
            x for x in (info.device, info.dtype_reason or info.dtype, quantized) if x))
        mode = plain_mode(info.device, info.dtype, info.quantization)
        if info.demo:
            return _banner(
                "demo",
                f"⚠ <b>โมเดลสาธิต / Demo model</b>: ยังไม่ได้โหลดโมเดลจริง คำตอบเป็นข้อความสุ่ม "
                "ไว้ลองใช้หน้าจอเท่านั้น / the real model is not loaded: answers are random text "
                f"for trying the page out, <b>not meaningful</b>. {details}")
        parts = [public_base_model(info.base_model) or "", "LoRA adapter" if info.adapter else ""]
        model = html.escape(" + ".join(p for p in parts if p))
        detail = f" ({model})" if model else ""
        return _banner("ready", f"พร้อมใช้งาน / Ready: <b>{name}</b>{detail} · {mode} {details}")
    error = html.escape(public_failure(engine) or "")
    return _banner("error", f"โมเดลใช้งานไม่ได้ / Model unavailable: {error}")


def plain_mode(device: str | None, dtype: str | None, quantization: str | None) -> str:
    """Where the model runs, in words an analyst knows (the rest is in the tooltip)."""
    device = (device or "").lower()
    if device.startswith("cuda"):
        return "การ์ดจอ / GPU"
    if device.startswith("mps"):
        return "ชิป Apple / Apple GPU"
    fast = quantization not in (None, "none") or (dtype or "") in ("bfloat16", "float16")
    return "โหมด CPU แบบเร็ว / fast CPU mode" if fast else "ซีพียู / CPU"


def _details(text: str) -> str:
    """A "details" mark whose tooltip holds the engineering detail, and where the rest is."""
    tip = html.escape(f"{text} — /health" if text else "/health", quote=True)
    return f'<span class="details" title="{tip}" tabindex="0">รายละเอียด / details</span>'



def status_is_final(engine: Engine) -> bool:
    """No need to poll any more once loading has ended one way or the other."""
    return engine.current_state() is not EngineState.LOADING


def _banner(kind: str, body: str) -> str:
    return f'<div class="banner {kind}" data-state="{kind}">{body}</div>'
