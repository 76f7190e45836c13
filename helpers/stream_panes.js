function render({ model, el: host }) {
  const root = document.createElement("div");
  root.className = "kvb-panes";
  root.dataset.testid = "stream-panes";
  host.appendChild(root);
  const fmt = (v, unit, digits) => (v === null || v === undefined) ? "—" : `${v.toFixed(digits)} ${unit}`;
  const views = {};
  function view(name) {
    if (views[name]) return views[name];
    const pane = document.createElement("div");
    pane.className = `kvb-pane kvb-pane-${name}`;
    pane.dataset.testid = `pane-${name}`;
    pane.innerHTML = `
      <div class="kvb-pane-head"><b class="kvb-label"></b> <span class="kvb-url"></span></div>
      <div class="kvb-stats">
        <span class="kvb-state" data-testid="state-${name}"></span>
        <span class="kvb-ttft" data-testid="ttft-${name}"></span>
        <span class="kvb-tps" data-testid="tps-${name}"></span>
        <span class="kvb-reuse" data-testid="reuse-${name}"></span>
      </div>
      <div class="kvb-error" data-testid="error-${name}"></div>
      <pre class="kvb-text" data-testid="text-${name}"></pre>`;
    root.querySelector(".kvb-row").appendChild(pane);
    return (views[name] = pane);
  }
  root.innerHTML = `<div class="kvb-row"></div><div class="kvb-summary" data-testid="summary"></div>`;
  function draw() {
    for (const p of model.get("panes")) {
      const v = view(p.name);
      v.dataset.state = p.state;
      v.querySelector(".kvb-label").textContent = p.label;
      v.querySelector(".kvb-url").textContent = p.url;
      v.querySelector(".kvb-state").textContent = p.state;
      v.querySelector(".kvb-ttft").textContent = `TTFT ${fmt(p.ttft_s, "s", 2)}`;
      v.querySelector(".kvb-tps").textContent = `${fmt(p.tokens_per_s, "tok/s", 1)}`;
      v.querySelector(".kvb-reuse").textContent = p.reuse || "";
      v.querySelector(".kvb-error").textContent = p.error || "";
      v.querySelector(".kvb-text").textContent = p.text;
    }
    root.querySelector(".kvb-summary").textContent = model.get("summary");
  }
  draw();
  model.on("change:panes", draw);
  model.on("change:summary", draw);
  return () => { model.off("change:panes", draw); model.off("change:summary", draw); };
}
export default { render };
