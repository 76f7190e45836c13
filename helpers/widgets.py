"""Widgets for notebook 01: a chunk picker, two side-by-side streaming answer panes, and the app that
ties them to the engines and to a live TTFT chart.

The picker and the panes are anywidgets whose JavaScript and CSS sit next to this file
(`chunk_picker.js`/`.css`, `stream_panes.js`/`.css`; plain ES modules, no CDN, no build step): the
picker uses native HTML5 drag-and-drop and its Python `order` trait is the API, so a script sets
`picker.order = [...]` and a user drags; both go through the same code. DOM elements carry stable
`data-testid`s and `kvb-*` classes for browser tests.

Streaming answers arrive on two threads, token by token. `StreamPanes.update` coalesces them so the
front end gets at most ~15 messages a second, plus one at each first token (TTFT must show at once)
and one at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anywidget
import ipywidgets as w
import traitlets as t

from . import client, gpu_results, plots, runtime
from . import engines as eng
from . import library as lib
from .retrieval import Retriever
from .runtime import Engine
from .settings import BLEND

HERE = Path(__file__).parent
PICKER_JS, PICKER_CSS = HERE / "chunk_picker.js", HERE / "chunk_picker.css"
PANES_JS, PANES_CSS = HERE / "stream_panes.js", HERE / "stream_panes.css"


# ------------------------------------------------------------------ chunk picker
class ChunkPicker(anywidget.AnyWidget):
    """Pick chunks from the library (the ffmpeg/ corpus and your documents, see helpers.library) and
    put them in prompt order.

    `order` (chunk names, first chunk first) is the API: the browser writes it on every tick or
    drag, and code may set it. `tokens` is the sum of the picked chunks' token counts, computed here
    in the kernel, so what the page shows is what the prompt will hold."""

    _esm = PICKER_JS
    _css = PICKER_CSS
    chunks = t.List(t.Dict()).tag(sync=True)  # the library: [{"name", "title", "tokens"}]
    order = t.List(t.Unicode()).tag(sync=True)
    tokens = t.Int(0).tag(sync=True)

    def __init__(self, order: Sequence[str] = (), library: lib.Library | None = None, **kw):
        self.library = library or lib.current()
        super().__init__(chunks=self.library.entries, **kw)
        if isinstance(order, str):
            raise TypeError(f"order is a list of chunk names, e.g. [{order!r}], not a string")
        self.order = list(order)

    @t.validate("order")
    def _valid_order(self, proposal):
        names = list(dict.fromkeys(proposal["value"]))  # a chunk appears once
        unknown = sorted(set(names) - {c["name"] for c in self.chunks})
        if unknown:
            raise t.TraitError(f"Unknown chunk(s) {unknown}: use names from picker.library.texts "
                               "(corpus.load_manifest() lists the ffmpeg/ ones), e.g. 'filter_scale'.")
        return names

    @t.observe("order")
    def _count(self, _=None):
        sizes = {c["name"]: c["tokens"] for c in self.chunks}
        self.tokens = sum(sizes[n] for n in self.order)

    def texts(self) -> list[str]:
        """The picked chunks' texts, in prompt order."""
        return [self.library.texts[n] for n in self.order]


# ------------------------------------------------------------------ streaming panes
PANE_LABELS = {"blend": "blend: reuses cached chunk KV", "full": "full prefill"}


def pane_header(e) -> str:
    """The engine's URL, with its blend settings when they are known (`runtime.blend_settings`)."""
    settings = runtime.blend_settings(e)
    return e.url + (f" · {settings}" if settings else "")


def _pane(name: str, url: str = "") -> dict:
    return {"name": name, "label": PANE_LABELS.get(name, name), "url": url, "state": "idle", "text": "",
            "ttft_s": None, "tokens_per_s": None, "n_tokens": 0, "error": None, "reuse": ""}


def reuse_line(info: dict) -> str:
    """What the engine did with the prompt's tokens, from its `x_blend` report (empty if none)."""
    n, recomputed = info.get("n_tokens"), info.get("n_recomputed")
    if n is None:
        return ""
    if recomputed is None:  # a full prefill computes every token
        return f"computed all {n} tokens"
    return f"reused {n - recomputed} · recomputed {recomputed} of {n} tokens"


class StreamPanes(anywidget.AnyWidget):
    """Two answers streaming side by side, each with its TTFT (shown at the first token) and its
    tokens/s (shown at the end). `update(answer)` may be called from any thread, as often as tokens
    arrive; see `hz`."""

    _esm = PANES_JS
    _css = PANES_CSS
    panes = t.List(t.Dict()).tag(sync=True)
    summary = t.Unicode("").tag(sync=True)

    def __init__(self, names: Sequence[str] = ("blend", "full"), urls: Sequence[str] = (), hz: float = 15,
                 clock: Callable[[], float] = time.monotonic, **kw):
        urls = [*urls, *[""] * (len(names) - len(urls))]
        super().__init__(panes=[_pane(n, u) for n, u in zip(names, urls, strict=True)], **kw)
        self.interval, self.clock = 1.0 / hz, clock
        self._lock = threading.Lock()
        self._pending: dict[str, dict] = {}
        self._last = float("-inf")
        self.pushes = 0  # front-end updates sent (tests check the throttle with it)

    def reset(self, state: str = "waiting") -> None:
        """Clear both panes before a new question."""
        with self._lock:
            self._pending.clear()
            self.panes = [{**_pane(p["name"], p["url"]), "state": state} for p in self.panes]
            self.summary = ""

    def update(self, ans: client.Answer) -> None:
        """Record the answer's current state; send it now if it is the first token, the end, or
        the last send was more than 1/hz ago. Otherwise a later call carries it."""
        new = {"text": ans.text, "ttft_s": ans.ttft_s, "tokens_per_s": ans.tokens_per_s,
               "n_tokens": ans.n_tokens, "error": ans.error, "reuse": reuse_line(ans.info),
               "state": "error" if ans.error else "done" if ans.done else "streaming"}
        with self._lock:
            old = self._pending.get(ans.engine) or self._get(ans.engine)
            self._pending[ans.engine] = new
            first = old.get("ttft_s") is None and ans.ttft_s is not None
            if first or ans.done or self.clock() - self._last >= self.interval:
                self._flush()

    def _get(self, name: str) -> dict:
        return next((p for p in self.panes if p["name"] == name), {})

    def _flush(self) -> None:
        if self._pending:
            self.panes = [{**p, **self._pending.pop(p["name"], {})} for p in self.panes]
            self._last = self.clock()
            self.pushes += 1


def summary(answers: dict[str, client.Answer]) -> str:
    """One line comparing the two TTFTs, or why there is no comparison."""
    b, f = answers.get("blend"), answers.get("full")
    if not (b and f) or b.error or f.error or not (b.ttft_s and f.ttft_s):
        return "No comparison: an engine did not answer (see its pane)."
    if b.ttft_s <= f.ttft_s:
        return (f"Blend answered first: TTFT {b.ttft_s:.2f} s vs {f.ttft_s:.2f} s, "
                f"{f.ttft_s / b.ttft_s:.1f}x sooner.")
    return f"Full prefill answered first this time: TTFT {f.ttft_s:.2f} s vs {b.ttft_s:.2f} s."


def agreement(answers: dict[str, client.Answer]) -> str:
    """Whether the two answers agree: blending should change the speed, not the answer."""
    b, f = answers.get("blend"), answers.get("full")
    if not (b and f) or b.error or f.error:
        return ""
    if b.text.strip() == f.text.strip():
        return "Both answers are the same."
    if b.first_token == f.first_token:
        return "The answers start with the same token, then differ."
    return "The answers differ from the first token on."


# ------------------------------------------------------------------ the quick-start app
class CompareApp(w.VBox):
    """Picker, question box, retrieve toggle, the two streaming panes and a live TTFT chart.

    `ask(question)` is the scripted path and the button's action alike. With the retrieve toggle on,
    a new question first puts its top-k chunks (BM25 over the picker's library) into the picker in
    score order; asking the same question again keeps the order the user dragged. Then it
    precomputes the picked chunks' KV on the blend engine (a no-op once cached), asks both engines at
    the same time and adds the question's TTFTs to `history` and to the live chart."""

    def __init__(self, engines: Sequence[Engine], picker: ChunkPicker | None = None,
                 question: str = "", max_tokens: int = 48, retrieve: bool = True, k: int = 4):
        self.engines = tuple(engines)
        self.picker = picker or ChunkPicker()
        self.max_tokens = max_tokens
        self.k = k
        self.retriever = Retriever(self.picker.library.texts)
        self.retrieve = w.Checkbox(value=retrieve, indent=False, layout=w.Layout(width="auto"),
                                   description=f"retrieve the top {k} chunks for the question")
        self.retrieve.add_class("kvb-retrieve")
        self._retrieved_for: str | None = None
        self.question = w.Text(value=question, placeholder="Ask a question about the picked chunks",
                               layout=w.Layout(width="70%"))
        self.question.add_class("kvb-question")
        self.button = w.Button(description="Ask both engines", button_style="primary", icon="play")
        self.button.add_class("kvb-ask")
        self.button.on_click(lambda _: threading.Thread(target=self._ask_safely, daemon=True).start())
        self.panes = StreamPanes([e.name for e in self.engines], [pane_header(e) for e in self.engines])
        self.chart = plots.ttft_live()
        self.chart_box = w.Box([self.chart])
        self.chart_box.add_class("kvb-ttft-chart")
        self.history: list[dict] = []
        self._busy = threading.Lock()
        super().__init__([self.picker, w.HBox([self.question, self.button]), self.retrieve, self.panes,
                          self.chart_box])

    def ask(self, question: str | None = None) -> dict[str, client.Answer]:
        """Ask both engines about the picked chunks; blocks until both answers are complete."""
        if question is not None:
            self.question.value = question
        q = self.question.value.strip()
        if not q:
            raise ValueError("Type a question first (or pass one: app.ask('...')).")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("Still answering the previous question; wait for it to finish.")
        try:
            retrieved = self._retrieve(q)
            if not self.picker.order:
                raise ValueError("Pick at least one chunk: tick it in the library, or set picker.order"
                                 + (" (the retriever found no chunk sharing a word with the question)."
                                    if self.retrieve.value else "."))
            self.button.disabled = True
            order, tokens, chunks = list(self.picker.order), self.picker.tokens, self.picker.texts()
            self.panes.reset("computing chunk KV")
            warm_error = self._warm(chunks)
            self.panes.reset()
            answers = client.ask_both(chunks, q, self.max_tokens, on_update=self.panes.update,
                                      engines=self.engines)
            note = warm_error if warm_error and not answers["blend"].error else ""
            line = " ".join(filter(None, [summary(answers), agreement(answers)]))
            self.panes.summary = line + (f" Note: {note}" if note else "")
            record = {"n": len(self.history) + 1, "question": q, "order": order, "tokens": tokens,
                      "retrieved": retrieved, **{name: answer_record(a) for name, a in answers.items()}}
            self.history.append(record)
            plots.add_ttft(self.chart, record)
            return answers
        finally:
            self.button.disabled = False
            self._busy.release()

    def _retrieve(self, question: str) -> bool:
        """With the toggle on and a new question: its top-k chunks into the picker, best first."""
        if not self.retrieve.value or question == self._retrieved_for:
            return False
        names = [name for name, _ in self.retriever.search(question, self.k)]
        self._retrieved_for = question
        if names:
            self.picker.order = names
        return bool(names)

    def _warm(self, chunks: list[str]) -> str | None:
        """Compute the chunks' KV on the blend engine before timing anything; the engines launched
        by `launch_engines.sh` have them all already. Returns an error message, if any."""
        blend = next((e for e in self.engines if e.name == "blend"), None)
        if blend is None:
            return None
        try:
            eng.precompute(blend, chunks, progress=False)
        except Exception as err:  # noqa: BLE001 - a note under the panes; a dead engine's pane says more
            return (f"Could not precompute the chunks' KV on {blend.url} ({err}); this answer's TTFT "
                    "includes computing it.")
        return None

    def _ask_safely(self) -> None:
        """The button's action: errors go under the panes, not into a thread's traceback that
        nobody sees."""
        try:
            self.ask()
        except Exception as err:  # noqa: BLE001
            self.panes.summary = f"Could not ask: {err}"

    def results(self) -> dict:
        """The questions asked so far and the median TTFT ratio (full / blend) of those both
        engines answered."""
        ratios = [r["full"]["ttft_s"] / r["blend"]["ttft_s"] for r in self.history
                  if r["blend"]["ttft_s"] and r["full"]["ttft_s"]
                  and not (r["blend"]["error"] or r["full"]["error"])]
        return {"history": self.history, "ttft_ratio": gpu_results.median(ratios)}


def answer_record(a: client.Answer) -> dict:
    """The JSON-able part of an Answer."""
    return {"text": a.text, "first_token": a.first_token, "ttft_s": a.ttft_s, "tokens_per_s": a.tokens_per_s,
            "n_tokens": a.n_tokens, "prompt_tokens": a.prompt_tokens, "error": a.error,
            "n_recomputed": a.info.get("n_recomputed")}


# ------------------------------------------------------------------ notebook 02: the ratio slider
class RatioExplorer(w.VBox):
    """A recompute-ratio slider over one prompt: moving it reruns the blended prefill and redraws
    which tokens get recomputed, the time it took and how close the next token is to a full
    prefill. Setting `slider.value` from code does the same (the scripted path)."""

    def __init__(self, run: Callable[[float], dict], tokens: list[str], ratio: float = BLEND.ratio):
        """`run(ratio)` returns {"deviation", "selected", "ttft_ms", "kl", "top1", "next_token"}
        (see `walkthrough.explain`)."""
        self.run, self.tokens = run, tokens
        self.slider = w.FloatSlider(value=ratio, min=0.0, max=1.0, step=0.05, description="ratio r",
                                    continuous_update=False, readout_format=".2f")
        self.slider.add_class("kvb-ratio")
        self.stats = w.HTML()
        self.text = w.HTML()
        first = run(ratio)
        self.chart = plots.deviation(first["deviation"], first["selected"], tokens, widget=True)
        self._show(first)
        self.slider.observe(lambda ch: self._show(self.run(ch["new"])), names="value")
        super().__init__([self.slider, self.stats, self.chart, self.text])

    def _show(self, res: dict) -> None:
        self.last = res
        n_sel, n = len(res["selected"]), len(res["deviation"])
        title = f"r = {res['ratio']:.2f}: {n_sel} of {n} cached tokens recomputed"
        plots.set_selected(self.chart, res["selected"], title)
        self.stats.value = (f"<b>{title}</b> · prefill {res['ttft_ms']:.0f} ms · next token "
                            f"{res['next_token']!r} ({'same as' if res['top1'] else 'differs from'} full "
                            f"prefill) · KL {res['kl']:.4f}")
        self.text.value = plots.highlighted_text(self.tokens, res["selected"], res["deviation"])
