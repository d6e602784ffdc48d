"""An idle server costs (almost) nothing: Gradio's queue does not poll every millisecond.

Gradio 6.31's queue (``queueing.Queue``) looks for work every 1 ms while it has none and for
progress every 10 ms, so a server nobody used spent about 7% of a core, forever, on the
cores that generate. ``thai_ui.mount`` slows both polls; these tests pin that Gradio still
reads the attributes it sets, and measure an idle server's CPU from /proc.
"""

from __future__ import annotations

import inspect
import time

import httpx

from tests.support import idle_engine, proc_cost


def test_gradios_queue_still_polls_by_the_attributes_the_mount_sets():
    from gradio import queueing

    from thai_ui.mount import PROGRESS_POLL_S, QUEUE_IDLE_POLL_S

    assert "await asyncio.sleep(self.sleep_when_free)" in inspect.getsource(
        queueing.Queue.start_processing)
    assert "await asyncio.sleep(self.progress_update_sleep_when_free)" in inspect.getsource(
        queueing.Queue.start_progress_updates)
    assert QUEUE_IDLE_POLL_S >= 0.02 and PROGRESS_POLL_S >= 0.05


def test_a_mounted_ui_polls_its_queue_gently():
    from starlette.routing import Mount

    from api.server import create_app
    from api.settings import Settings
    from tests.fakes import FakeEngine
    from thai_ui.mount import PROGRESS_POLL_S, QUEUE_IDLE_POLL_S

    app = create_app(Settings.from_overrides({}), FakeEngine())
    mount = next(r for r in app.router.routes if isinstance(r, Mount) and r.path == "/ui")
    queue = mount.app.app.get_blocks()._queue
    assert queue.sleep_when_free == QUEUE_IDLE_POLL_S
    assert queue.progress_update_sleep_when_free == PROGRESS_POLL_S


def test_an_idle_server_with_the_ui_uses_under_4_percent_of_a_core(live_server):
    """CPU seconds over 5 s of nothing, from /proc (on a busy machine a poll costs no more
    CPU, it only runs later). Before, this server spent 0.35 s of CPU in 5 idle seconds."""
    assert httpx.get(live_server.url + "/ui/", timeout=60).status_code == 200
    idle_engine(live_server.url)  # whatever an earlier test left running has finished
    time.sleep(1)
    before, _ = proc_cost(live_server.pid)
    time.sleep(5)
    after, _ = proc_cost(live_server.pid)
    assert after - before < 0.2, f"{after - before:.2f} CPU s in 5 idle seconds"
