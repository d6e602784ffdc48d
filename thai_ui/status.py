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
    info = engine.info
    state = engine.current_state()
    name = html.escape(info.model_name)
    if state is EngineState.LOADING:
        return _banner("loading", f"กำลังโหลดโมเดล <b>{name}</b>… / Loading the model…")
    if state is EngineState.READY:
        # Which dtype and quantization, and why ("bfloat16: this CPU has native bf16
        # (avx512_bf16)", "w8a8 chosen by THAI_QUANTIZATION=auto: KL ...").
        quantized = info.quantization_reason if info.quantization not in (None, "none") else None
        where = html.escape(" · ".join(
            x for x in (info.device, info.dtype_reason or info.dtype, quantized) if x))
        if info.demo:
            return _banner(
                "demo",
                f"⚠ <b>โมเดลสาธิต / Demo checkpoint</b> ({name}, {where}): โมเดลจริงไม่ได้ถูกโหลด "
                "ผลลัพธ์เป็นข้อความสุ่มที่ไม่มีความหมาย / the real model is not loaded; this tiny "
                "random-weight model proves the path works but its output is <b>not meaningful</b>.")
        parts = [public_base_model(info.base_model) or "", "LoRA adapter" if info.adapter else ""]
        model = html.escape(" + ".join(p for p in parts if p))
        detail = f" ({model})" if model else ""
        return _banner("ready", f"พร้อมใช้งาน / Ready: <b>{name}</b>{detail} · {where}")
    error = html.escape(public_failure(engine) or "")
    return _banner("error", f"โมเดลใช้งานไม่ได้ / Model unavailable: {error}")


def status_is_final(engine: Engine) -> bool:
    """No need to poll any more once loading has ended one way or the other."""
    return engine.current_state() is not EngineState.LOADING


def _banner(kind: str, body: str) -> str:
    return f'<div class="banner {kind}" data-state="{kind}">{body}</div>'
