function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  e.append(...kids);
  return e;
}

function render({ model, el: host }) {
  const root = el("div", { class: "kvb-picker", "data-testid": "chunk-picker" });
  host.appendChild(root);
  const setOrder = (order) => { model.set("order", order); model.save_changes(); };
  let dragged = null;

  // Drop `name` before or after `target` (or at the end when target is null) in the context.
  function dropAt(name, target, after) {
    const order = model.get("order").filter((n) => n !== name);
    let i = target === null ? order.length : order.indexOf(target) + (after ? 1 : 0);
    if (i < 0) i = order.length;
    order.splice(i, 0, name);
    setOrder(order);
  }
  function clearMarks() {
    root.querySelectorAll(".kvb-drop-before, .kvb-drop-after")
      .forEach((e) => e.classList.remove("kvb-drop-before", "kvb-drop-after"));
  }
  function draggable(li, name) {
    li.draggable = true;
    li.addEventListener("dragstart", (ev) => {
      dragged = name;
      ev.dataTransfer.setData("text/plain", name);
      ev.dataTransfer.effectAllowed = "move";
      li.classList.add("kvb-dragging");
    });
    li.addEventListener("dragend", () => {
      dragged = null;
      li.classList.remove("kvb-dragging");
      clearMarks();
    });
  }
  const nameOf = (ev) => ev.dataTransfer.getData("text/plain") || dragged;

  // The page is built once; a change redraws the context list and the visible library rows only.
  // With thousands of chunks the library shows LIMIT rows that match the filter (search, then pick).
  const LIMIT = 200;
  let query = "";
  const count = el("span", { class: "kvb-token-count", "data-testid": "token-count" });
  const selected = el("ol", { class: "kvb-selected", "data-testid": "selected-chunks" });
  const library = el("ul", { class: "kvb-library", "data-testid": "chunk-library" });
  const more = el("div", { class: "kvb-hint kvb-more", "data-testid": "library-more" });
  const filter = el("input", { type: "search", class: "kvb-filter", "data-testid": "chunk-filter",
                               placeholder: "filter the library by title or name" });
  filter.addEventListener("input", () => { query = filter.value.trim().toLowerCase(); drawLibrary(); });
  selected.addEventListener("dragover", (ev) => ev.preventDefault());
  selected.addEventListener("drop", (ev) => {
    ev.preventDefault();
    clearMarks();
    const src = nameOf(ev);
    if (src) dropAt(src, null, true);
  });
  // Dropping a context chunk on the library takes it out of the context.
  library.addEventListener("dragover", (ev) => ev.preventDefault());
  library.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const src = nameOf(ev);
    if (src && model.get("order").includes(src)) setOrder(model.get("order").filter((n) => n !== src));
  });
  root.replaceChildren(
    el("div", { class: "kvb-head" }, el("b", {}, "Context, in prompt order "),
       el("span", { class: "kvb-hint" }, "(drag to reorder) "), count),
    selected,
    el("div", { class: "kvb-head" }, el("b", {}, "Library "),
       el("span", { class: "kvb-hint" }, "(tick to add; tokens per chunk on the right) "), filter),
    library, more);

  function drawContext() {
    const order = model.get("order");
    const byName = Object.fromEntries(model.get("chunks").map((c) => [c.name, c]));
    count.textContent = `${model.get("tokens")} tokens in ${order.length} chunks`;
    const rows = order.map((name, i) => {
      const c = byName[name] || { title: name, tokens: "?" };
      const btn = (label, testid, title, fn) =>
        el("button", { class: "kvb-btn", "data-testid": testid, title, onclick: fn }, label);
      const move = (d) => () => {
        const o = [...order]; const j = i + d;
        if (j < 0 || j >= o.length) return;
        [o[i], o[j]] = [o[j], o[i]]; setOrder(o);
      };
      const li = el("li", { class: "kvb-chunk kvb-chunk-selected", "data-testid": "selected-chunk",
                            "data-name": name },
        el("span", { class: "kvb-handle", title: "drag to reorder" }, "⠿"),
        el("span", { class: "kvb-pos" }, `${i + 1}.`),
        el("span", { class: "kvb-title" }, c.title),
        el("span", { class: "kvb-tokens" }, `${c.tokens}`),
        btn("▲", "move-up", "move up", move(-1)), btn("▼", "move-down", "move down", move(1)),
        btn("✕", "remove", "remove from the context", () => setOrder(order.filter((n) => n !== name))));
      draggable(li, name);
      li.addEventListener("dragover", (ev) => {
        ev.preventDefault();
        ev.stopPropagation();
        const r = li.getBoundingClientRect();
        clearMarks();
        li.classList.add(ev.clientY > r.top + r.height / 2 ? "kvb-drop-after" : "kvb-drop-before");
      });
      li.addEventListener("drop", (ev) => {
        ev.preventDefault();
        ev.stopPropagation();
        const r = li.getBoundingClientRect();
        const src = nameOf(ev);
        clearMarks();
        if (src && src !== name) dropAt(src, name, ev.clientY > r.top + r.height / 2);
      });
      return li;
    });
    selected.replaceChildren(...(rows.length ? rows
      : [el("li", { class: "kvb-empty" }, "Tick chunks below, or drag them here.")]));
  }

  function drawLibrary() {
    const scroll = library.scrollTop;  // keep it across redraws
    const inContext = new Set(model.get("order"));
    const chunks = model.get("chunks");
    const matches = query ? chunks.filter((c) => `${c.title} ${c.name}`.toLowerCase().includes(query))
      : chunks;
    library.replaceChildren(...matches.slice(0, LIMIT).map((c) => {
      const box = el("input", { type: "checkbox", class: "kvb-check", "data-testid": "chunk-checkbox" });
      box.checked = inContext.has(c.name);
      box.addEventListener("change", () => {
        const order = model.get("order");
        setOrder(box.checked ? [...order, c.name] : order.filter((n) => n !== c.name));
      });
      const li = el("li", { class: "kvb-chunk kvb-chunk-library" + (box.checked ? " kvb-in-context" : ""),
                            "data-testid": "library-chunk", "data-name": c.name },
        el("label", {}, box, el("span", { class: "kvb-title" }, c.title)),
        el("span", { class: "kvb-tokens" }, `${c.tokens}`));
      draggable(li, c.name);
      return li;
    }));
    more.textContent = matches.length > LIMIT
      ? `showing ${LIMIT} of ${matches.length} chunks: type in the filter to find the others`
      : (query && !matches.length ? "no chunk matches the filter" : "");
    library.scrollTop = scroll;
  }

  function draw() {
    drawContext();
    drawLibrary();
  }
  const onCount = () => {
    count.textContent = `${model.get("tokens")} tokens in ${model.get("order").length} chunks`;
  };
  draw();
  model.on("change:order", draw);
  model.on("change:chunks", draw);
  model.on("change:tokens", onCount);
  return () => {
    model.off("change:order", draw);
    model.off("change:chunks", draw);
    model.off("change:tokens", onCount);
  };
}
export default { render };
