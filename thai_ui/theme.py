"""Theme, CSS and <head> for the UI: Thai typography without the network.

Gradio's default fonts have no Thai glyphs, and ``gr.themes.GoogleFont`` makes
the browser fetch from Google at run time. Instead the app serves the bundled
Sarabun web font itself (``assets/fonts``, SIL OFL) at ``ui/fonts``, and the
head links its stylesheet with a *relative* URL: the page lives at ``.../ui/``,
so ``fonts/fonts.css`` (``FONT_SUBPATH``) resolves under whatever prefix a
reverse proxy adds (the ASGI root path), and the ``@font-face`` URLs inside it
resolve next to the stylesheet.

These go to ``gr.mount_gradio_app`` (Gradio 6 ignores theme/css/head given to
``gr.Blocks``).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

FONT_DIR = Path(__file__).resolve().parents[1] / "assets" / "fonts"
# The app's icon, served at the UI's own favicon.ico (public with the UI) and at /favicon.ico.
FAVICON = FONT_DIR.parent / "favicon.ico"
# Served by the app below the UI's own mount point (registered before it, so it wins),
# and linked relative to the UI page.
FONT_SUBPATH = "fonts"
FONT_FAMILY = "Sarabun"
# Thai stacks vowels and tone marks above and below the consonant: it needs more
# leading than Latin text, or the marks of neighbouring lines collide.
THAI_LINE_HEIGHT = 1.75


def build_theme() -> gr.themes.Base:
    """A Gradio theme whose text font is the bundled Sarabun (no font fetched from elsewhere)."""
    return gr.themes.Soft(
        primary_hue="teal",
        secondary_hue="amber",
        font=[gr.themes.Font(FONT_FAMILY), "Tahoma", "sans-serif"],
        font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"],
    ).set(body_text_size="16px")


# Gradio 6.31's page reads a toast's title from a field its client never fills, so every
# error toast says English "Error" whatever gr.Error(title=...) sends: name it in Thai too.
TOAST_TITLES_JS = """<script>
(() => {
  const titles = {error: "ข้อผิดพลาด / Error", warning: "คำเตือน / Warning", info: "ข้อมูล / Info"};
  const relabel = () => document.querySelectorAll(".toast-title").forEach((el) => {
    const kind = Object.keys(titles).find((k) => el.classList.contains(k));
    const text = el.firstChild;
    if (kind && text && text.nodeType === 3 && text.data.trim() !== titles[kind]) {
      text.data = titles[kind] + " ";
    }
  });
  new MutationObserver(relabel).observe(document.documentElement, {childList: true, subtree: true});
})();
</script>"""


def build_head() -> str:
    # Relative to the page's <base href="./"> (the /ui/ mount), so it survives a sub-path.
    return (f'<link rel="stylesheet" href="{FONT_SUBPATH}/fonts.css">\n'
            '<meta name="description" content="สรุปข้อความภาษาไทยและสนทนากับโมเดล / '
            'Thai summarization and chat">\n'
            '<link rel="icon" href="favicon.ico" type="image/x-icon">\n' + TOAST_TITLES_JS)


def build_css() -> str:
    return f"""
.gradio-container, .gradio-container * {{
  font-family: "{FONT_FAMILY}", Tahoma, sans-serif;
}}
.gradio-container code, .gradio-container pre {{
  font-family: ui-monospace, Menlo, Consolas, monospace;
}}
.gradio-container textarea, .gradio-container .prose, .gradio-container p,
.gradio-container .message, .gradio-container label {{
  line-height: {THAI_LINE_HEIGHT} !important;
}}
#thai-input textarea, #thai-summary textarea {{
  font-size: 17px;
}}
#model-status .banner {{
  padding: 0.6em 1em; border-radius: 8px; margin: 0;
}}
#model-status .banner.loading {{ background: #fef9c3; color: #713f12; }}
#model-status .banner.ready {{ background: #ccfbf1; color: #134e4a; }}
#model-status .banner.demo {{ background: #fee2e2; color: #7f1d1d; border: 2px solid #f87171; }}
#model-status .banner.error {{ background: #fee2e2; color: #7f1d1d; }}
#batch-progress .batch-progress {{
  padding: 0.6em 1em; border-radius: 8px; background: var(--block-background-fill);
  border: 1px solid var(--block-border-color);
}}
#batch-progress .batch-state {{ font-weight: 600; }}
#batch-progress progress {{
  width: 100%; height: 14px; margin: 0.4em 0; accent-color: #0d9488;
}}
#batch-progress [data-state="stopped"] .batch-state {{ color: #92400e; }}
#batch-progress [data-state="failed"] .batch-state {{ color: #b91c1c; }}
#batch-progress .batch-note {{ color: var(--body-text-color-subdued); }}
#model-status .details {{ cursor: help; opacity: 0.75; margin-left: 0.4em; font-size: 0.85em;
  text-decoration: underline dotted; }}
/* An error is said once, in its toast (Thai and English): not again as a red "Error" badge
   over every output of the failed event, hiding the text box and the summary. */
[data-testid="status-tracker"]:has(span.error) {{ display: none !important; }}
/* Gradio ends its footer with a separator meant for a link that is switched off here. */
footer .divider:last-child {{ display: none; }}
"""
