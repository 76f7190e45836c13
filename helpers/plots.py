"""Plotly charts for the notebooks.

Final charts are static `go.Figure`s, so a saved or papermill-executed notebook keeps them in its
outputs. Only live views (the TTFT chart that grows as the user asks) are `go.FigureWidget`s, which
need a running kernel to show anything.
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .gpu_results import crossover, fit_cost_model, median

COLORS = {"blend": "#1f9e89", "full": "#e4572e", "reuse": "#7e57c2", "selected": "#e4572e",
          "kept": "#9fb3c8"}
LABELS = {"blend": "blend (cached chunk KV)", "full": "full prefill", "reuse": "naive reuse (r = 0)"}


def _layout(fig: go.Figure, title: str, **kw) -> go.Figure:
    fig.update_layout(title=title, template="plotly_white", height=kw.pop("height", 380),
                      margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.2), **kw)
    return fig


# ------------------------------------------------------------------ notebook 01: TTFT per question
def ttft_live() -> go.FigureWidget:
    """An empty TTFT-per-question chart that `add_ttft` extends while the kernel runs."""
    fig = go.FigureWidget([go.Scatter(x=[], y=[], name=LABELS[e], mode="lines+markers",
                                      marker=dict(size=10, color=COLORS[e]), customdata=[],
                                      hovertemplate="%{customdata}<br>TTFT %{y:.2f} s<extra></extra>")
                           for e in ("blend", "full")])
    return _layout(fig, "Time to first token, per question", xaxis_title="question #",
                   yaxis_title="TTFT (s)", yaxis_rangemode="tozero", xaxis_dtick=1)


def add_ttft(fig: go.FigureWidget, record: dict) -> None:
    """Append one question (a record from `widgets.CompareApp.history`) to the live chart."""
    with fig.batch_update():
        for trace, e in zip(fig.data, ("blend", "full"), strict=True):
            trace.x = (*trace.x, record["n"])
            trace.y = (*trace.y, record[e]["ttft_s"])
            trace.customdata = (*trace.customdata, f"{record['question'][:60]} ({record['tokens']} tokens)")


def ttft_history(history: list[dict]) -> go.Figure:
    """Static grouped bars of TTFT per question, blend next to full, speed-up written on top."""
    x = [f"#{r['n']}: {r['question'][:28]}" for r in history]
    fig = go.Figure([go.Bar(x=x, y=[r[e]["ttft_s"] for r in history], name=LABELS[e],
                            marker_color=COLORS[e]) for e in ("blend", "full")])
    for xi, r in zip(x, history, strict=True):
        b, f = r["blend"]["ttft_s"], r["full"]["ttft_s"]
        if b and f:
            fig.add_annotation(x=xi, y=max(b, f), text=f"{f / b:.1f}x", showarrow=False, yshift=12)
    return _layout(fig, "TTFT per question (both engines asked at the same time)", barmode="group",
                   yaxis_title="TTFT (s)")


# ------------------------------------------------------------------ notebook 02: inside blending
def next_token_bars(tops: dict[str, list[tuple[str, float]]], title: str) -> go.Figure:
    """Grouped bars of the next-token probabilities, one group per candidate token.

    `tops` maps a method ("full", "reuse", "blend") to its top-k [(token, prob)]; the union of all
    candidates is shown so a token one method likes and another ignores is visible."""
    tokens = list(dict.fromkeys(t for top in tops.values() for t, _ in top))
    fig = go.Figure()
    for method, top in tops.items():
        p = dict(top)
        fig.add_bar(x=[repr(t) for t in tokens], y=[p.get(t, 0.0) for t in tokens],
                    name=LABELS.get(method, method), marker_color=COLORS.get(method))
    return _layout(fig, title, barmode="group", yaxis_title="probability", xaxis_title="next token")


def rope_errors(rows: list[dict]) -> go.Figure:
    """Per-layer error of cached K against a full prefill's K, without and with re-rotation."""
    layers = [r["layer"] for r in rows]
    fig = go.Figure([
        go.Scatter(x=layers, y=[r["unrotated"] for r in rows], name="cached K at its old positions",
                   mode="lines+markers", line_color=COLORS["reuse"]),
        go.Scatter(x=layers, y=[r["rerotated"] for r in rows], name="cached K re-rotated",
                   mode="lines+markers", line_color=COLORS["blend"]),
    ])
    return _layout(fig, "K of a cached chunk vs. a full prefill (relative error)", xaxis_title="layer",
                   yaxis_title="relative L2 error", yaxis_type="log")


def deviation(dev: list[float], selected: list[int], tokens: list[str], title: str = "",
              widget: bool = False) -> go.Figure:
    """Per cached token: how far its cached KV is from a fresh one at the check layer, on a log
    scale (a few tokens deviate by orders of magnitude more than the rest); the tokens selected for
    recompute in red. `widget=True` for the ratio slider's live view."""
    fig = (go.FigureWidget if widget else go.Figure)([
        go.Scatter(x=list(range(len(dev))), y=dev, mode="markers", name="deviation",
                   marker=dict(size=5, color=_sel_colors(len(dev), selected)),
                   customdata=[repr(t) for t in tokens[:len(dev)]],
                   hovertemplate="position %{x}: %{customdata}<br>deviation %{y:.3g}<extra></extra>")])
    return _layout(fig, title or "KV deviation per cached token at the check layer (red: recomputed)",
                   xaxis_title="token position", yaxis_title="||V_fresh - V_cached||²", yaxis_type="log")


def set_selected(fig: go.FigureWidget, selected: list[int], title: str) -> None:
    """Recolour a `deviation(widget=True)` chart for a new selection."""
    with fig.batch_update():
        fig.data[0].marker.color = _sel_colors(len(fig.data[0].y), selected)
        fig.layout.title.text = title


def _sel_colors(n: int, selected: list[int]) -> list[str]:
    sel = set(selected)
    return [COLORS["selected"] if i in sel else COLORS["kept"] for i in range(n)]


def highlighted_text(tokens: list[str], selected: list[int], dev: list[float] | None = None,
                     limit: int = 1500) -> str:
    """HTML of the prompt's cached tokens: selected ones marked, the rest shaded by deviation."""
    sel, top = set(selected), max(dev or [0.0]) or 1.0
    out = []
    for i, tok in enumerate(tokens[:limit]):
        text = html.escape(tok).replace("\n", "↵<br>")
        if i in sel:
            out.append(f'<mark class="kvb-selected" title="position {i}">{text}</mark>')
        elif dev and i < len(dev):
            out.append(f'<span style="background: rgba(228,87,46,{0.35 * dev[i] / top:.2f})">{text}</span>')
        else:
            out.append(text)
    more = f"<br>... ({len(tokens) - limit} more tokens)" if len(tokens) > limit else ""
    return ('<div class="kvb-highlight" style="font-family: monospace; font-size: 12px; '
            f'line-height: 1.6; max-height: 300px; overflow-y: auto">{"".join(out)}{more}</div>')


def ratio_sweep(rows: list[dict]) -> go.Figure:
    """TTFT and fidelity against the recompute ratio; the full prefill is the dashed reference."""
    blend = [r for r in rows if r["method"] == "blend"]
    full = next(r for r in rows if r["method"] == "full")
    x = [r["ratio"] for r in blend]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("TTFT (ms)", "KL vs full prefill",
                                                        "agreement with full prefill / answer F1"))
    fig.add_scatter(x=x, y=[r["ttft_ms"] for r in blend], name="blend TTFT", mode="lines+markers",
                    line_color=COLORS["blend"], row=1, col=1)
    fig.add_hline(y=full["ttft_ms"], line_dash="dash", line_color=COLORS["full"], row=1, col=1,
                  annotation_text="full prefill")
    fig.add_scatter(x=x, y=[max(r["kl"], 1e-6) for r in blend], name="KL", mode="lines+markers",
                    line_color=COLORS["reuse"], row=1, col=2)
    for key, name, dash in (("top1", "first-token agreement", "solid"), ("f1", "answer F1 (gold)", "dot"),
                            ("f1_vs_full", "answer F1 vs full prefill's", "dash")):
        fig.add_scatter(x=x, y=[r[key] for r in blend], name=name, mode="lines+markers",
                        line_dash=dash, row=1, col=3)
    fig.add_hline(y=full["f1"], line_dash="dash", line_color=COLORS["full"], row=1, col=3,
                  annotation_text="full prefill F1")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_yaxes(range=[0, 1.05], row=1, col=3)
    fig.update_xaxes(title_text="recompute ratio r")
    return _layout(fig, "What the recompute ratio buys: speed vs. fidelity", height=420)


# ------------------------------------------------------------------ notebook 03: benchmark
def ttft_boxes(rows: list[dict]) -> go.Figure:
    """Box plot of TTFT per context size and engine (rows from `bench.sweep_engines`)."""
    sizes = sorted({r["target_tokens"] for r in rows})
    label = {s: f"~{s} tokens" for s in sizes}
    fig = go.Figure([go.Box(x=[label[r["target_tokens"]] for r in rows if r["engine"] == e],
                            y=[r["ttft_ms"] for r in rows if r["engine"] == e], name=LABELS[e],
                            marker_color=COLORS[e], boxpoints="all", jitter=0.3)
                     for e in ("blend", "full")])
    return _layout(fig, "TTFT by context length", boxmode="group", yaxis_title="TTFT (ms)",
                   xaxis_title="context length (target)")


def speedup(summary: list[dict], gpu: list[dict] | None = None) -> go.Figure:
    """Median speed-up (full TTFT / blend TTFT) against prompt tokens on this machine; GPU rows
    (`load_gpu_csv`, best through `latest_runs`) drawn alongside, one line per card, shape and path."""
    fig = go.Figure(go.Scatter(x=[s["tokens"] for s in summary], y=[s["speedup"] for s in summary],
                               name="this machine", mode="lines+markers", line_color=COLORS["blend"]))
    for label in dict.fromkeys(g["label"] for g in gpu or []):
        g = sorted((r for r in gpu if r["label"] == label), key=lambda r: r["tokens"])
        fig.add_scatter(x=[r["tokens"] for r in g], y=[r["speedup"] for r in g], mode="lines+markers",
                        name=f"measured: {label}", line_dash="dot")
    fig.add_hline(y=1, line_dash="dash", line_color="gray", annotation_text="no gain")
    return _layout(fig, "TTFT speed-up of blending (full / blend)", xaxis_title="prompt tokens",
                   yaxis_title="speed-up (x)", yaxis_rangemode="tozero")


def rag_trace(rows: list[dict]) -> go.Figure:
    """A RAG trace (rows from `rag.run_trace`): TTFT of both engines per question, and the time to
    first token that blending saved, added up over the trace."""
    x = [r["n"] for r in rows]
    hover = [f"{r['question'][:60]}<br>{', '.join(r['retrieved'])}" for r in rows]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12, row_heights=[0.6, 0.4],
                        subplot_titles=("TTFT per question (each retrieves its own top-k chunks)",
                                        "time to first token saved, cumulative"))
    for e in ("full", "blend"):
        fig.add_scatter(x=x, y=[r[f"{e}_ttft_s"] for r in rows], name=LABELS[e], mode="lines+markers",
                        line_color=COLORS[e], customdata=hover, row=1, col=1,
                        hovertemplate="#%{x}: %{customdata}<br>TTFT %{y:.2f} s<extra></extra>")
    saved, total = [], 0.0
    for r in rows:
        total += r["full_ttft_s"] - r["blend_ttft_s"]
        saved.append(total)
    fig.add_scatter(x=x, y=saved, name="saved by blending", mode="lines", fill="tozeroy",
                    line_color=COLORS["blend"], row=2, col=1)
    fig.update_yaxes(title_text="TTFT (s)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="seconds", row=2, col=1)
    fig.update_xaxes(title_text="question #", row=2, col=1)
    return _layout(fig, "A RAG trace: blend vs full prefill", height=520)


def load_curve(rows: list[dict], limit_s: float | None = None) -> go.Figure:
    """TTFT against request rate (rows from `load.sweep`): p50 solid, p99 dashed, per engine, and the
    p99 limit the highest sustainable rate is read against (the CacheBlend paper's Fig. 14 shape)."""
    fig = go.Figure()
    for e in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == e]
        for p, dash in (("p50", "solid"), ("p99", "dash")):
            fig.add_scatter(x=[r["rate"] for r in mine], y=[r[f"ttft_{p}_s"] for r in mine],
                            name=f"{LABELS.get(e, e)} {p}", mode="lines+markers",
                            line={"color": COLORS.get(e), "dash": dash},
                            customdata=[[r["completed"], r["sent"]] for r in mine],
                            hovertemplate="%{x:g} req/s: TTFT %{y:.2f} s (%{customdata[0]} of "
                                          "%{customdata[1]} completed)<extra></extra>")
    if limit_s:
        fig.add_hline(y=limit_s, line_dash="dot", line_color="gray",
                      annotation_text=f"p99 limit {limit_s:g} s")
    fig.update_xaxes(title_text="request rate (requests/s)")
    fig.update_yaxes(title_text="TTFT (s)", type="log")
    return _layout(fig, "TTFT against request rate: blend vs full prefill")


def gpu_ttft(rows: list[dict]) -> go.Figure:
    """TTFT on the GPU by prompt length: per run (card and model shape), plain vLLM and one line per
    blend path, labelled with the card, and the prompt length where each path starts to win. Pass
    `latest_runs(rows)` for the current truth (a handful of lines), all rows for the history."""
    fig = go.Figure()
    dashes = {"fast": "solid", "fixed": "dash", "upstream": "dot"}
    for run in dict.fromkeys(r["run"] for r in rows):
        g = [r for r in rows if r["run"] == run and r["full_ms"] is not None]
        tokens = sorted({r["tokens"] for r in g})
        full = [median([r["full_ms"] for r in g if r["tokens"] == t]) for t in tokens]
        fig.add_scatter(x=tokens, y=full, name=f"{run}: plain vLLM ({LABELS['full']})", mode="lines+markers",
                        line=dict(color=COLORS["full"]))
        for label in dict.fromkeys(r["label"] for r in g):
            p = sorted((r for r in g if r["label"] == label), key=lambda r: r["tokens"])
            cross, path = crossover(p), p[0]["blend_path"]
            fig.add_scatter(x=[r["tokens"] for r in p], y=[r["blend_ms"] for r in p], mode="lines+markers",
                            name=f"{label} blend" + (f" (wins past ~{cross:,.0f} tokens)" if cross else ""),
                            line=dict(dash=dashes.get(path, "dot"),
                                      color="#999999" if path == "upstream" else COLORS["blend"]))
    cards = " and ".join(dict.fromkeys(r["card"] for r in rows)) or "GPUs"
    return _layout(fig, f"Measured on {cards}: TTFT by prompt length", xaxis_title="prompt tokens",
                   yaxis_title="TTFT (ms)", yaxis_rangemode="tozero")


# ------------------------------------------------------------------ notebook 03: a cost model of TTFT


def cost_model(rows: list[dict], card: str | None = None) -> go.Figure:
    """Measured blend TTFT (markers) against the fitted cost model (lines), one colour per blend
    path and model shape of one card (`rows`: `latest_runs`' rows; `card`: the first one's if None)."""
    card = card or (rows[0]["card"] if rows else "GPU")
    fig = go.Figure()
    palette = ["#1f9e89", "#999999", "#7e57c2", "#e4572e"]
    for i, label in enumerate(dict.fromkeys(r["label"] for r in rows if r["card"] == card)):
        g = sorted((r for r in rows if r["label"] == label), key=lambda r: r["tokens"])
        fit = fit_cost_model(g)
        color = palette[i % len(palette)]
        fig.add_scatter(x=[r["tokens"] for r in g], y=[r["blend_ms"] for r in g], mode="markers",
                        marker=dict(size=9, color=color), name=f"{label}: measured")
        fig.add_scatter(x=[r["tokens"] for r in g], y=fit["predicted_ms"], mode="lines",
                        line=dict(color=color, dash="dash"),
                        name=f"{label}: {fit['c_ms']:.0f} ms + {fit['r']:.2f} x prefill"
                             + (f" + {fit['l_ms_per_1k']:.1f} ms/1K tokens" if fit["l_ms_per_1k"] else ""))
    return _layout(fig, f"TTFT = fixed cost + r x full prefill + KV load, fitted ({card})",
                   xaxis_title="prompt tokens", yaxis_title="blend TTFT (ms)", xaxis_type="log", height=440)


def gpu_quality(rows: list[dict], prompt_set: str = "qa") -> go.Figure:
    """How far each engine's first-token distribution is from a full prefill's (top-20 KL, log
    scale), GPU and embedded side by side; the float32-vs-bf16 row is the GPU's noise floor. Pass
    `latest_quality(rows)` for the current run, all rows for the history."""
    g = [r for r in rows if r["prompt_set"] == prompt_set and r["engine"] != "full"]
    # runs differ in size, card and what precompute stored: every bar its own row
    names = [f"{r['backend']}: {r['engine']} ({r['prompts']} prompts, {r.get('card') or r.get('gpus')}"
             + (f", {r['date']}" if r.get("date") else "")
             + (f", stored {r['precompute']}" if r.get("precompute") else "") + ")" for r in g]
    colors = [COLORS["full"] if "fp32" in r["engine"] else
              "#999999" if r.get("blend_path") == "upstream" or r["engine"] == "naive_reuse" else
              COLORS["blend"] for r in g]
    fig = go.Figure(go.Bar(x=[max(r["top20_kl_mean"], 1e-4) for r in g], y=names, orientation="h",
                           marker_color=colors,
                           text=[f"{r['top20_kl_mean']:.4f}, {r['first_token_agree']}/{r['prompts']}"
                                 for r in g], textposition="outside"))
    return _layout(fig, f"Blend vs full prefill, real weights ({prompt_set} prompts): top-20 KL",
                   xaxis_title="top-20 KL to full prefill (log; lower is closer)", xaxis_type="log",
                   height=60 + 28 * len(g))


