"""The chunk picker's front end with thousands of chunks, in real Chromium: ticking a chunk stays
quick because the library draws only the rows that match its filter (at most `LIMIT`), and the filter
finds a chunk that is not drawn at first. The widget's own JavaScript runs against a stand-in of
anywidget's model, so no JupyterLab is needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ui, pytest.mark.timeout(120)]

JS = Path(__file__).resolve().parents[2] / "helpers" / "chunk_picker.js"
N_CHUNKS = 10_000

PAGE = """<!doctype html><html><body><div id="host"></div><script type="module">
const source = %s;
const { default: widget } = await import("data:text/javascript," + encodeURIComponent(source));
const state = { chunks: %s, order: [], tokens: 0 };
const handlers = {};
const model = {
  get: (k) => state[k],
  set: (k, v) => { state[k] = v; },
  save_changes: () => { (handlers["change:order"] || []).forEach((f) => f()); },
  on: (ev, f) => { (handlers[ev] = handlers[ev] || []).push(f); },
  off: () => {},
};
widget.render({ model, el: document.getElementById("host") });
window.model = model;
window.ready = true;
</script></body></html>"""


def test_picker_stays_responsive_with_ten_thousand_chunks(page):
    chunks = [{"name": f"doc_{i}", "title": f"Section {i} of the manual", "tokens": 400}
              for i in range(N_CHUNKS)]
    page.set_content(PAGE % (json.dumps(JS.read_text()), json.dumps(chunks)))
    page.wait_for_function("window.ready === true", timeout=30_000)
    rows = page.locator("[data-testid=library-chunk]")
    assert rows.count() <= 200
    assert "of 10000 chunks" in page.locator("[data-testid=library-more]").inner_text()
    ticks = []
    for i in range(5):  # each tick redraws: time it inside the page
        ticks.append(page.evaluate("""(i) => {
            const t0 = performance.now();
            document.querySelectorAll("[data-testid=chunk-checkbox]")[i].click();
            return performance.now() - t0; }""", i))
    assert page.evaluate("window.model.get('order')") == [f"doc_{i}" for i in range(5)]
    assert max(ticks) < 250, f"a tick took {max(ticks):.0f} ms with {N_CHUNKS} chunks: {ticks}"
    page.fill("[data-testid=chunk-filter]", "section 9876 ")
    page.wait_for_function("document.querySelectorAll('[data-testid=library-chunk]').length === 1")
    page.locator("[data-testid=chunk-checkbox]").first.click()
    assert page.evaluate("window.model.get('order')")[-1] == "doc_9876"
    assert page.locator("[data-testid=selected-chunk]").count() == 6
    assert not page.console_errors, page.console_errors
