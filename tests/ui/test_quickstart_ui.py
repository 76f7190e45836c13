"""Notebook 01 in a real JupyterLab in headless Chromium: what papermill cannot check, since it runs
no JavaScript. Run all cells, drag chunks with the mouse (HTML5 drag and drop), ask a question with
the button and watch both answers stream, their TTFTs and the live chart's new points.

The notebook is a copy whose parameters cell points at the embedded engines pytest started
(`live_engines`); `START_ENGINES = False`, so it cannot start others. Screenshots go to
tests/artifacts/ (`ui_quickstart*.png`; `ui_quickstart_failure.png` when it fails)."""

from __future__ import annotations

import json
import re
import time

import pytest

from .conftest import ARTIFACTS, ROOT, parameterized_copy

pytestmark = [pytest.mark.ui, pytest.mark.timeout(480)]

NOTEBOOK = "01_quickstart.ipynb"
CHUNKS = ["encoder_flac", "protocol_rtmp", "filter_crop"]  # the notebook reverses them once
ADDED = "filter_amix"  # dragged from the library into the context
QUESTION = "What does the crop filter do, and which options does it take?"


@pytest.fixture
def lab(live_engines, lab_factory, tmp_path):
    nb = parameterized_copy(ROOT / "notebooks" / NOTEBOOK, tmp_path / NOTEBOOK, {
        "BACKEND": "embedded", "BLEND_PORT": live_engines["blend"].port,
        "FULL_PORT": live_engines["full"].port, "START_ENGINES": False, "CHUNKS": CHUNKS,
        "MAX_TOKENS": 24,
        "RETRIEVE": False})  # the hand-picked path: the drags decide the order (retrieval: test_widgets)
    return lab_factory({NOTEBOOK: nb})


# ------------------------------------------------------------------ JupyterLab, as a user drives it
def fail(page, lab, message: str):
    console = "\n".join(page.console_errors[-10:]) or "(none)"
    log = "\n".join(lab["log"].read_text(errors="replace").splitlines()[-15:])
    pytest.fail(f"{message}\n\nbrowser console errors:\n{console}\n\nJupyterLab log (last lines):\n{log}",
                pytrace=False)


def cell_errors(page) -> list[str]:
    """Tracebacks shown in the notebook's outputs."""
    return page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").filter(
        has_text=re.compile("Error|Traceback")).all_inner_texts()


def wait_until(page, lab, what: str, check, timeout: float, interval: float = 0.25):
    """Poll `check()` until it returns something truthy; fail (with any cell traceback, the console
    errors and the server log) after `timeout` seconds or as soon as a cell shows a traceback."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        errors = cell_errors(page)
        if errors:
            fail(page, lab, f"A cell failed while waiting for {what}:\n{errors[-1][-3000:]}")
        if time.monotonic() > deadline:
            fail(page, lab, f"Timed out after {timeout:.0f} s waiting for {what}.")
        page.wait_for_timeout(interval * 1000)


def open_notebook(page, lab) -> None:
    page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK}?token={lab['token']}")
    # The kernel is ready once the status bar names it and says Idle (the toolbar's indicator says
    # idle earlier, while the status bar still says "No Kernel | Initializing").
    ready = page.locator(".jp-StatusBar-Widget").filter(has_text=re.compile(r"\(ipykernel\) \| Idle"))
    wait_until(page, lab, "the notebook to open with an idle Python 3 kernel", lambda: ready.count(), 90)


def menu(page, *path: str) -> None:
    """Click through the menu bar, e.g. menu(page, "Run", "Run All Cells")."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{path[0]}$")).click()
    for item in path[1:]:
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).click()


def run_all(page, lab) -> None:
    """Run > Run All Cells, then check that cells were queued (a prompt shows [*] or a number): a
    menu item clicked while JupyterLab is still busy setting up may do nothing, so try twice."""
    prompts = page.locator(".jp-NotebookPanel .jp-InputPrompt").filter(has_text=re.compile(r"\[(\*|\d+)\]"))
    for _ in range(2):
        menu(page, "Run", "Run All Cells")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if prompts.count():
                return
            page.wait_for_timeout(250)
        page.keyboard.press("Escape")  # close the menu if it is still open
    fail(page, lab, "Run > Run All Cells queued no cell (no prompt shows [*] or a number).")


def run_new_cell(page, lab, code: str, marker: str) -> str:
    """Add a cell at the end, type `code` in it, run it (Shift-Enter) and return the output line
    that starts with `marker`."""
    cells = page.locator(".jp-NotebookPanel .jp-Notebook-cell")
    n = cells.count()
    cells.nth(n - 1).locator(".jp-InputPrompt").click()  # select the last cell (command mode)
    page.keyboard.press("Escape")
    page.keyboard.press("b")  # insert a cell below and select it
    wait_until(page, lab, "a new cell", lambda: cells.count() == n + 1, 10)
    new = cells.nth(n)
    new.locator(".cm-content").click()
    page.keyboard.insert_text(code)  # as pasted: no auto-closed brackets
    page.keyboard.press("Shift+Enter")

    def output():
        for line in new.locator(".jp-OutputArea-output").all_inner_texts():
            for s in line.splitlines():
                if s.startswith(marker):
                    return s[len(marker):]
        return None

    return wait_until(page, lab, f"the output of `{code}`", output, 30)


def kernel_state(page, lab) -> dict:
    code = ('import json; print("STATE=" + json.dumps({"order": picker.order, "tokens": picker.tokens, '
            '"history": [{"question": r["question"], "order": r["order"]} for r in app.history]}))')
    return json.loads(run_new_cell(page, lab, code, "STATE="))


# ------------------------------------------------------------------ the widgets
def selected(page) -> list[str]:
    return [e.get_attribute("data-name") for e in page.get_by_test_id("selected-chunk").all()]


def token_count(page) -> tuple[int, int]:
    text = page.get_by_test_id("token-count").inner_text()
    m = re.fullmatch(r"(\d+) tokens in (\d+) chunks", text.strip())
    assert m, f"unexpected token count text {text!r}"
    return int(m[1]), int(m[2])


def mouse_drag(page, source, target, *, lower_half: bool) -> None:
    """Press the mouse on `source`, move it over `target` (its lower or upper half) in steps, release:
    Chromium turns this into HTML5 dragstart / dragover / drop."""
    source.scroll_into_view_if_needed()
    s = source.bounding_box()
    t = target.bounding_box()
    page.mouse.move(s["x"] + 20, s["y"] + s["height"] / 2)
    page.mouse.down()
    page.mouse.move(s["x"] + 30, s["y"] + s["height"] / 2 + 5, steps=3)
    y = t["y"] + t["height"] * (0.75 if lower_half else 0.25)
    page.mouse.move(t["x"] + t["width"] / 2, y, steps=10)
    page.mouse.up()


POINTS = ".kvb-ttft-chart path.point"

# Records every state the panes show, from the page: a MutationObserver sees each update the
# kernel pushes, however short-lived, which polling from here could miss.
WATCH_PANES = """() => {
  const seen = window.__kvbSeen = [];
  const root = document.querySelector("[data-testid=stream-panes]");
  const snap = () => {
    const s = { summary: root.querySelector("[data-testid=summary]").textContent };
    for (const name of ["blend", "full"]) {
      s[name] = { state: root.querySelector(`[data-testid=state-${name}]`).textContent,
                  text: root.querySelector(`[data-testid=text-${name}]`).textContent,
                  ttft: root.querySelector(`[data-testid=ttft-${name}]`).textContent };
    }
    const key = JSON.stringify(s);
    if (!seen.length || JSON.stringify(seen[seen.length - 1]) !== key) seen.push(s);
  };
  snap();
  new MutationObserver(snap).observe(root, { subtree: true, childList: true, characterData: true });
}"""


def test_quickstart_in_jupyterlab(page, lab):
    t0 = time.monotonic()
    try:
        run_quickstart(page, lab)
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "ui_quickstart_failure.png")
        raise
    print(f"UI test: {time.monotonic() - t0:.0f} s in the browser")


def run_quickstart(page, lab):
    open_notebook(page, lab)
    run_all(page, lab)
    last_output = page.locator(".jp-OutputArea-output", has_text="median TTFT ratio")
    wait_until(page, lab, "all cells to run (the last prints the median TTFT ratio)",
               lambda: last_output.count() > 0, 300)

    # --- the picker shows the notebook's order; the chart has both scripted questions
    picker = page.get_by_test_id("chunk-picker")
    assert picker.is_visible(), "the chunk picker did not render"
    start = CHUNKS[::-1]
    assert selected(page) == start, "the picker does not show the order the notebook set"
    wait_until(page, lab, "the live TTFT chart to show 4 points (2 scripted questions x 2 engines)",
               lambda: page.locator(POINTS).count() == 4, 20)
    tokens0, n0 = token_count(page)
    assert n0 == 3
    state = kernel_state(page, lab)
    assert state["order"] == start and state["tokens"] == tokens0, state

    # --- drag the first context chunk below the last one
    mouse_drag(page, page.locator(f"[data-testid=selected-chunk][data-name={start[0]}]"),
               page.locator(f"[data-testid=selected-chunk][data-name={start[-1]}]"), lower_half=True)
    reordered = [*start[1:], start[0]]
    wait_until(page, lab, f"the picker to show {reordered} after the drag",
               lambda: selected(page) == reordered, 10)
    state = kernel_state(page, lab)
    assert state["order"] == reordered, f"the kernel's picker.order did not follow the drag: {state}"
    assert state["tokens"] == tokens0 and token_count(page) == (tokens0, 3)

    # --- drag a library chunk into the context, above the first chunk
    lib_item = page.locator(f"[data-testid=library-chunk][data-name={ADDED}]")
    added_tokens = int(lib_item.locator(".kvb-tokens").inner_text())
    mouse_drag(page, lib_item, page.locator(f"[data-testid=selected-chunk][data-name={reordered[0]}]"),
               lower_half=False)
    grown = [ADDED, *reordered]
    wait_until(page, lab, f"the picker to show {grown} after dragging {ADDED} in",
               lambda: selected(page) == grown, 10)
    wait_until(page, lab, "the token count to include the new chunk",
               lambda: token_count(page) == (tokens0 + added_tokens, 4), 10)
    assert lib_item.locator(".kvb-check").is_checked(), "the library does not tick the added chunk"
    state = kernel_state(page, lab)
    assert state["order"] == grown, f"the kernel's picker.order did not follow the drag: {state}"
    assert state["tokens"] == tokens0 + added_tokens, state

    # --- type a question, press the button, watch both panes stream
    box = page.locator(".kvb-question input")
    box.click()
    box.press("ControlOrMeta+a")
    box.press_sequentially(QUESTION)
    page.evaluate(WATCH_PANES)
    page.locator(".kvb-ask").click()
    seen = lambda: page.evaluate("window.__kvbSeen")  # noqa: E731

    def answered():
        s = seen()
        done = s[-1]["summary"] and (any(x["summary"] == "" for x in s)  # cleared, then written
                                     or s[-1]["summary"].startswith("Could not ask"))
        return done and s

    # the button's ask clears the summary, precomputes the new chunk's KV, then streams both answers
    states = wait_until(page, lab, "both answers (the summary line under the panes)", answered, 180)
    final = states[-1]
    assert not final["summary"].startswith(("Could not ask", "No comparison")), final["summary"]
    for name in ("blend", "full"):
        pane = final[name]
        assert pane["state"] == "done", f"{name} pane ended {pane['state']!r}: {pane}"
        assert pane["text"].strip(), f"{name} pane shows no answer"
        m = re.fullmatch(r"TTFT (\d+\.\d+) s", pane["ttft"])
        assert m and float(m[1]) > 0, f"{name} pane shows no TTFT: {pane['ttft']!r}"
        streamed = [x[name]["text"] for x in states if x[name]["state"] == "streaming" and x[name]["text"]]
        assert streamed, f"the {name} pane never showed partial text while streaming: {states}"
        assert len(streamed[0]) < len(pane["text"]), (
            f"the {name} pane's text did not grow while streaming: first {streamed[0]!r}, "
            f"final {pane['text']!r}")
        print(f"{name}: {len(set(streamed))} partial texts while streaming, {pane['ttft']}")

    # --- the retrieve toggle shows unticked; the blend pane says how many tokens it reused
    assert not page.locator(".kvb-retrieve input").is_checked(), "the retrieve toggle should be off"
    reuse = page.get_by_test_id("reuse-blend").inner_text()
    assert re.fullmatch(r"reused \d+ · recomputed \d+ of \d+ tokens", reuse), reuse
    assert page.get_by_test_id("reuse-full").inner_text().startswith("computed all ")

    # --- the live chart gains this question's two points
    wait_until(page, lab, "the live TTFT chart to show 6 points (3 questions x 2 engines)",
               lambda: page.locator(POINTS).count() == 6, 20)
    state = kernel_state(page, lab)
    assert state["history"][-1] == {"question": QUESTION, "order": grown}, state

    # --- screenshots: the page around the app, and the whole app
    ARTIFACTS.mkdir(exist_ok=True)
    picker.scroll_into_view_if_needed()
    page.mouse.move(0, 0)
    page.screenshot(path=ARTIFACTS / "ui_quickstart.png")
    app = page.locator(".jp-OutputArea-output").filter(has=picker)
    app.screenshot(path=ARTIFACTS / "ui_quickstart_app.png")
    assert not cell_errors(page), cell_errors(page)
