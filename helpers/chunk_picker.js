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

  function draw() {
    const scroll = root.querySelector(".kvb-library")?.scrollTop || 0;  // keep it across redraws
    const chunks = model.get("chunks");
    const order = model.get("order");
    const byName = Object.fromEntries(chunks.map((c) => [c.name, c]));
    const count = el("span", { class: "kvb-token-count", "data-testid": "token-count" },
                     `${model.get("tokens")} tokens in ${order.length} chunks`);
    const selected = el("ol", { class: "kvb-selected", "data-testid": "selected-chunks" });
    order.forEach((name, i) => {
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
        const after = ev.clientY > r.top + r.height / 2;
        clearMarks();
        li.classList.add(after ? "kvb-drop-after" : "kvb-drop-before");
      });
      li.addEventListener("drop", (ev) => {
        ev.preventDefault();
        ev.stopPropagation();
        const r = li.getBoundingClientRect();
        const src = nameOf(ev);
        clearMarks();
        if (src && src !== name) dropAt(src, name, ev.clientY > r.top + r.height / 2);
      });
      selected.appendChild(li);
    });
    if (!order.length) selected.appendChild(
      el("li", { class: "kvb-empty" }, "Tick chunks below, or drag them here."));
    selected.addEventListener("dragover", (ev) => ev.preventDefault());
    selected.addEventListener("drop", (ev) => {
      ev.preventDefault();
      clearMarks();
      const src = nameOf(ev);
      if (src) dropAt(src, null, true);
    });

    const library = el("ul", { class: "kvb-library", "data-testid": "chunk-library" });
    for (const c of chunks) {
      const box = el("input", { type: "checkbox", class: "kvb-check", "data-testid": "chunk-checkbox" });
      box.checked = order.includes(c.name);
      box.addEventListener("change", () => setOrder(
        box.checked ? [...order, c.name] : order.filter((n) => n !== c.name)));
      const li = el("li", { class: "kvb-chunk kvb-chunk-library" + (box.checked ? " kvb-in-context" : ""),
                            "data-testid": "library-chunk", "data-name": c.name },
        el("label", {}, box, el("span", { class: "kvb-title" }, c.title)),
        el("span", { class: "kvb-tokens" }, `${c.tokens}`));
      draggable(li, c.name);
      library.appendChild(li);
    }
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
         el("span", { class: "kvb-hint" }, "(tick to add; tokens per chunk on the right)")),
      library);
    library.scrollTop = scroll;
  }
  const onCount = () => {
    const c = root.querySelector("[data-testid=token-count]");
    if (c) c.textContent = `${model.get("tokens")} tokens in ${model.get("order").length} chunks`;
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
