// SAE feature report: a single page that runs from file:// with no server. Data files are
// scripts calling SAEReport.<kind>(...), loaded on demand (browsers block fetch of local files).
// Routes: #/ (suite), #/hp/<hookpoint>?sort=&dir=&page=&q= (feature list),
// #/f/<hookpoint>/<id> (one feature), #/search?q= (feature id or token).
"use strict";
(function () {
  // ---- console errors are written into the page, where headless checks can read them
  function recordError(msg) {
    const box = document.getElementById("console-errors");
    if (box) box.textContent += msg + "\n";
    const root = document.documentElement;
    root.dataset.errors = String(Number(root.dataset.errors || 0) + 1);
  }
  window.addEventListener("error", (e) => recordError("error: " + e.message));
  window.addEventListener("unhandledrejection", (e) =>
    recordError("unhandled rejection: " + ((e.reason && e.reason.message) || e.reason)));
  const consoleError = console.error.bind(console);
  console.error = (...args) => { recordError(args.map(String).join(" ")); consoleError(...args); };

  const S = { suite: null, tokText: new Map(), special: new Set(), lists: {}, batches: {},
              loading: {}, lastHp: null };
  const PAGE = 100;

  // ---- data loading
  function loadScript(src) {
    if (!S.loading[src]) {
      S.loading[src] = new Promise((resolve, reject) => {
        const tag = document.createElement("script");
        tag.src = src;
        tag.onload = () => resolve();
        tag.onerror = () => { delete S.loading[src]; reject(new Error("cannot load " + src)); };
        document.body.appendChild(tag);
      });
    }
    return S.loading[src];
  }
  function hookpoint(name) {
    const hp = S.suite.hookpoints.find((h) => h.name === name);
    if (!hp) throw new Error("no hookpoint " + name + " in this report");
    return hp;
  }
  async function getList(hp) {
    if (!S.lists[hp]) await loadScript("data/" + hp + "/list.js");
    return S.lists[hp];
  }
  async function getFeature(hp, id) {
    const b = Math.floor(id / S.suite.per_file), key = hp + "/" + b;
    if (!S.batches[key]) await loadScript("data/" + hp + "/" + b + ".js");
    return S.batches[key][id - b * S.suite.per_file];
  }

  window.SAEReport = {
    suite(d) { S.suite = d; },
    vocab(d) {
      d.ids.forEach((id, k) => S.tokText.set(id, d.text[k]));
      d.special.forEach((id) => S.special.add(id));
    },
    list(hp, d) { S.lists[hp] = d; },
    batch(hp, b, recs) { S.batches[hp + "/" + b] = recs; },
    start() {
      window.addEventListener("hashchange", route);
      document.getElementById("search").addEventListener("submit", (e) => {
        e.preventDefault();
        location.hash = "#/search?q=" + encodeURIComponent(document.getElementById("search-q").value);
      });
      route();
    },
  };

  // ---- small helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "onclick") node.addEventListener("click", v);
      else node.setAttribute(k, v);
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  const fmt = (x, d = 3) => (x === null || x === undefined ? "–" :
    Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(d - 1) :
    String(Number(x.toPrecision(d))));
  const pct = (x) => (x === null ? "–" : x === 0 ? "0" : (100 * x).toPrecision(3) + "%");
  const featLink = (hp, id, text) => el("a", { href: "#/f/" + hp + "/" + id, class: "feature-link" },
                                        text === undefined ? hp + "/" + id : text);
  function tokText(id) {
    const t = S.tokText.has(id) ? S.tokText.get(id) : "⟨" + id + "⟩";
    return S.special.has(id) ? t : t.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
  }
  const chip = (id) => el("span", { class: "chip" + (S.special.has(id) ? " special" : ""),
                                    title: "token id " + id }, tokText(id));
  function b64bytes(s) {
    const bin = atob(s), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function decodeTokens(s) {
    const u = b64bytes(s), w = S.suite.token_width, none = 2 ** (8 * w) - 1, out = [];
    for (let i = 0; i < u.length; i += w) {
      let v = 0;
      for (let b = w - 1; b >= 0; b--) v = v * 256 + u[i + b];
      out.push(v === none ? -1 : v);
    }
    return out;
  }

  // ---- routing
  function parseHash() {
    const h = location.hash.slice(1) || "/";
    const [path, query] = h.split("?");
    return { parts: path.split("/").filter(Boolean).map(decodeURIComponent),
             params: new URLSearchParams(query || "") };
  }
  async function route() {
    const { parts, params } = parseHash(), app = document.getElementById("app");
    const root = document.documentElement;
    root.dataset.ready = "0";
    try {
      if (!S.suite) throw new Error("data/suite.js did not load");
      let view;
      if (parts[0] === "hp" && parts[1]) view = await viewList(parts[1], params);
      else if (parts[0] === "f" && parts[1]) view = await viewFeature(parts[1], Number(parts[2]));
      else if (parts[0] === "search") view = await viewSearch(params.get("q") || "");
      else view = viewIndex();
      app.replaceChildren(view);
      root.dataset.view = parts[0] || "index";
      window.scrollTo(0, 0);
    } catch (e) {
      app.replaceChildren(el("p", { class: "err" }, String(e.message || e)));
      console.error(String(e.message || e));
    }
    root.dataset.ready = "1";
  }

  // ---- the suite
  const METRIC_ORDER = ["fvu", "explained_variance", "l0", "dead_frac", "cosine", "delta_loss",
                        "loss_recovered", "kl", "tokens"];
  function viewIndex() {
    const s = S.suite, info = s.info, hps = s.hookpoints;
    const keys = METRIC_ORDER.filter((k) => hps.some((h) => k in h.metrics));
    const thr = info.features.token_level_f1;
    const head = el("tr", {}, el("th", { class: "l" }, "hookpoint"), keys.map((k) => el("th", {}, k)),
      ["features", "live", "F1 q25", "F1 median", "F1 q75", "F1 ≥ " + thr].map((k) => el("th", {}, k)));
    const rows = hps.map((h) => {
      const m = h.summary;
      return el("tr", {}, el("td", { class: "l" }, el("a", { href: "#/hp/" + h.name, class: "hp-link" }, h.name)),
        keys.map((k) => el("td", {}, fmt(h.metrics[k], 4))),
        el("td", {}, m.d_sae), el("td", {}, m.live), el("td", {}, fmt(m.f1_q25)),
        el("td", {}, fmt(m.f1_median)), el("td", {}, fmt(m.f1_q75)),
        el("td", {}, m.token_level + " (" + pct(m.token_level_frac ?? 0) + ")"));
    });
    const total = hps.reduce((a, h) => a + h.summary.d_sae, 0);
    return el("div", {},
      el("h1", {}, "Features of " + info.model),
      el("p", { class: "muted" }, info.suite + " · " + hps.length + " SAEs · " + total +
         " features · " + hps[0].summary.tokens + " held-out tokens (" + info.lm_tokens + " LM positions)"),
      el("table", { id: "suite-table" }, head, rows),
      el("p", { class: "muted" }, "Metrics from suite.json. F1: held-out detection F1 of each " +
         "feature's best set of ≤ " + info.features.explain_max_set + " tokens (found on the first " +
         hps[0].summary.explain_tokens + " tokens, measured on the other " +
         hps[0].summary.heldout_tokens + "); scored = features that fired or were predicted there."),
      steeringIndex());
  }
  function steeringIndex() {
    const st = S.suite.steering;
    if (!st) return null;
    const items = st.interventions.map((it) => el("li", {},
      it.hookpoint + " · " + (it.mode || "?") + " α=" + fmt(it.alpha ?? null) + " · positions " +
      (it.positions || "?") + " · features ",
      it.features.flatMap((f) => [featLink(it.hookpoint, f, String(f)), " "])));
    return el("div", { class: "panel" }, el("h2", {}, "Steering"),
      el("p", { class: "muted" }, st.source), el("ul", {}, items), steeringResults());
  }
  function steeringResults() {
    const st = S.suite.steering, out = [];
    const block = (name, text) => out.push(el("h3", {}, name),
      el("pre", {}, text.length > 8000 ? text.slice(0, 8000) + "\n…" : text));
    for (const [name, text] of Object.entries(st.tables || {})) block(name, text);
    for (const [name, value] of Object.entries(st.results || {}))
      block(name, typeof value === "string" ? value : JSON.stringify(value, null, 1));
    return out.length ? el("div", {}, out) : null;
  }

  // ---- the feature list of one hookpoint
  const COLUMNS = [["id", "feature"], ["freq", "density"], ["max", "max act"], ["f1", "F1"]];
  async function viewList(hp, params) {
    const h = hookpoint(hp), L = await getList(hp);
    S.lastHp = hp;
    const sort = params.get("sort") || "freq", dir = params.get("dir") || "desc";
    const q = (params.get("q") || "").trim();
    let ids = [...Array(h.summary.d_sae).keys()];
    if (q) ids = ids.filter((i) => matchesToken(L, i, q));
    const val = (i) => (sort === "id" ? i : L[sort][i]);
    ids.sort((a, b) => {
      const x = val(a), y = val(b);
      if (x === null || y === null) return (x === null) - (y === null);
      return dir === "asc" ? x - y : y - x;
    });
    const pages = Math.max(1, Math.ceil(ids.length / PAGE));
    const page = Math.min(Number(params.get("page") || 0), pages - 1);
    const link = (p) => "#/hp/" + hp + "?" + new URLSearchParams({ ...Object.fromEntries(params), ...p });
    const head = el("tr", {}, COLUMNS.map(([key, label]) => el("th", { class: "sortable" + (key === "id" ? " l" : "") },
        el("a", { href: link({ sort: key, dir: sort === key && dir === "desc" ? "asc" : "desc", page: 0 }) },
           label + (sort === key ? (dir === "desc" ? " ▼" : " ▲") : "")))),
      el("th", { class: "l" }, "explanation (token set)"), el("th", { class: "l" }, "top token"));
    const rows = ids.slice(page * PAGE, (page + 1) * PAGE).map((i) => el("tr", {},
      el("td", { class: "l" }, featLink(hp, i, String(i)), steerMark(L, i)),
      el("td", {}, pct(L.freq[i])), el("td", {}, fmt(L.max[i])), el("td", {}, fmt(L.f1[i])),
      el("td", { class: "l" }, L.ex[i].map(chip)),
      el("td", { class: "l" }, L.top[i] >= 0 ? chip(L.top[i]) : "–")));
    const filter = el("form", {}, el("input", { name: "q", value: q, placeholder: "token, e.g. the" }),
      el("button", { type: "submit" }, "Filter by token"));
    filter.addEventListener("submit", (e) => {
      e.preventDefault();
      location.hash = link({ q: filter.elements.q.value, page: 0 });
    });
    const pager = el("div", { class: "pager" },
      page > 0 ? el("a", { href: link({ page: page - 1 }) }, "‹ previous") : null, " page " + (page + 1) + " of " + pages + " ",
      page + 1 < pages ? el("a", { href: link({ page: page + 1 }) }, "next ›") : null);
    return el("div", {}, el("p", {}, el("a", { href: "#/" }, "suite"), " › " + hp),
      el("h1", {}, hp + " · " + h.summary.d_sae + " features"),
      el("p", { class: "muted" }, h.folder + " · " + h.summary.live + " fired · " +
         h.summary.token_level + " with F1 ≥ " + S.suite.info.features.token_level_f1 +
         (q ? " · " + ids.length + " match “" + q + "”" : "")),
      filter, pager, el("table", { id: "feature-table" }, head, rows), pager.cloneNode(true));
  }
  function matchesToken(L, i, q) {
    const norm = (s) => s.trim().toLowerCase(), want = norm(q);
    const hit = (id) => id >= 0 && S.tokText.has(id) && norm(S.tokText.get(id)) === want;
    return L.ex[i].some(hit) || hit(L.top[i]);
  }
  function steerMark(L, i) {
    return L.steer && L.steer[String(i)] ? el("span", { class: "steer", title: "steered in the refusal case study" }, "steered") : null;
  }

  // ---- search: a feature id, or a token across every hookpoint
  async function viewSearch(q) {
    q = q.trim();
    const m = q.match(/^(layers\.\d+\.\w+)[\/ #:]+(\d+)$/);
    if (m) { location.hash = "#/f/" + m[1] + "/" + m[2]; return el("p", {}, "…"); }
    if (/^\d+$/.test(q)) {
      const hp = S.lastHp || S.suite.hookpoints[0].name;
      location.hash = "#/f/" + hp + "/" + q;
      return el("p", {}, "…");
    }
    const sections = [];
    for (const h of S.suite.hookpoints) {
      const L = await getList(h.name), found = [];
      for (let i = 0; i < h.summary.d_sae; i++) if (matchesToken(L, i, q)) found.push(i);
      found.sort((a, b) => (L.f1[b] ?? -1) - (L.f1[a] ?? -1));
      if (found.length) sections.push(el("h2", {}, h.name + " (" + found.length + ")"),
        el("p", {}, found.slice(0, 200).flatMap((i) => [featLink(h.name, i, String(i)),
          el("span", { class: "muted" }, " F1 " + fmt(L.f1[i]) + "  ")])));
    }
    return el("div", {}, el("h1", {}, "Features for token “" + q + "”"),
      el("p", { class: "muted" }, "Features whose token-set explanation or top-activating token is this token (case-insensitive, surrounding spaces ignored)."),
      sections.length ? sections : el("p", {}, "No feature found."));
  }

  // ---- one feature
  async function viewFeature(hp, id) {
    const h = hookpoint(hp);
    if (!(id >= 0 && id < h.summary.d_sae)) throw new Error("feature " + id + " is not in 0.." + (h.summary.d_sae - 1));
    S.lastHp = hp;
    const [L, r] = await Promise.all([getList(hp), getFeature(hp, id)]);
    const density = r.n / h.summary.tokens;
    const nav = el("p", {}, el("a", { href: "#/" }, "suite"), " › ", el("a", { href: "#/hp/" + hp }, hp), " › " + id + "  ",
      id > 0 ? featLink(hp, id - 1, "‹ " + (id - 1)) : null, "  ",
      id + 1 < h.summary.d_sae ? featLink(hp, id + 1, (id + 1) + " ›") : null);
    const facts = el("table", { class: "facts" },
      el("tr", {}, el("th", { class: "l" }, "fires"), el("td", {}, r.n + " of " + h.summary.tokens + " tokens (" + pct(density) + ")")),
      el("tr", {}, el("th", { class: "l" }, "max activation"), el("td", {}, fmt(L.max[id], 4))),
      el("tr", {}, el("th", { class: "l" }, "explanation"), el("td", { class: "l" }, r.ex.length ? r.ex.map(chip) : "–")),
      el("tr", {}, el("th", { class: "l" }, "held-out F1"), el("td", {}, fmt(r.f1) + " (precision " + fmt(r.p) + ", recall " + fmt(r.r) + "; F1 where found " + fmt(r.f1e) + ")")),
      r.llm ? el("tr", {}, el("th", { class: "l" }, "LLM explanation"), el("td", { class: "l" }, r.llm)) : null);
    return el("div", { id: "feature" }, nav,
      el("h1", {}, hp + " / feature " + id, steerMark(L, id)),
      el("div", { class: "grid" }, el("div", { class: "panel" }, facts, histogram(r)),
        el("div", { class: "panel" }, logitTable(r))),
      steeringPanel(L, id),
      el("div", { class: "panel", id: "top-contexts" }, el("h2", {}, "Top activations"),
        r.top.length ? r.top.map((e) => context(e, L.max[id])) : el("p", { class: "muted" }, "never fired")),
      quantiles(r, L.max[id]));
  }
  function context(ex, maxAct) {
    const [value, toksB64, actsB64] = ex, toks = decodeTokens(toksB64), pairs = b64bytes(actsB64);
    const acts = new Uint8Array(toks.length);
    for (let k = 0; k < pairs.length; k += 2) acts[pairs[k]] = pairs[k + 1];
    const centre = S.suite.window_before, line = el("div", { class: "ctx" }, el("span", { class: "val" }, fmt(value, 3)));
    toks.forEach((t, k) => {
      if (t < 0) return;
      const a = acts[k], cls = "tok" + (k === centre ? " centre" : "") + (S.special.has(t) ? " special" : "");
      line.append(el("span", { class: cls, "data-token": t,
        style: a ? "background: rgba(230,126,34," + (0.15 + 0.85 * a / 255).toFixed(3) + ")" : null,
        title: "token " + t + (a ? " · activation ≈ " + fmt(a / 255 * maxAct) : " · not active") }, tokText(t)));
    });
    return line;
  }
  function quantiles(r, maxAct) {
    if (!r.q.length) return null;
    const groups = new Map();
    r.q.forEach((e) => { if (!groups.has(e[0])) groups.set(e[0], []); groups.get(e[0]).push(e.slice(1)); });
    const nBins = S.suite.info.features.quantile_bins, parts = [];
    for (const [g, exs] of groups) {
      parts.push(el("h3", {}, "Quantile bin " + (g + 1) + " of " + nBins + " · activations " +
        fmt(exs[0][0]) + " – " + fmt(exs[exs.length - 1][0])), exs.map((e) => context(e, maxAct)));
    }
    return el("div", { class: "panel", id: "quantile-contexts" }, el("h2", {}, "Activation-quantile samples"),
      el("p", { class: "muted" }, "A uniform random sample of the feature's firings, sorted by activation and cut into quantile bins."), parts);
  }
  function histogram(r) {
    if (!r.h.length) return el("p", { class: "muted" }, "no activations");
    const first = r.h[0], counts = r.h.slice(1), edges = S.suite.hist_edges;
    const W = 420, H = 110, bw = W / counts.length, top = Math.max(...counts);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "hist"); svg.setAttribute("width", W); svg.setAttribute("height", H + 16);
    counts.forEach((c, k) => {
      const rect = document.createElementNS(svg.namespaceURI, "rect"), hgt = c ? Math.max(1, H * c / top) : 0;
      rect.setAttribute("x", k * bw); rect.setAttribute("width", Math.max(1, bw - 1));
      rect.setAttribute("y", H - hgt); rect.setAttribute("height", hgt);
      const tip = document.createElementNS(svg.namespaceURI, "title");
      tip.textContent = fmt(edges[first + k]) + " – " + fmt(edges[first + k + 1]) + ": " + c;
      rect.append(tip); svg.append(rect);
    });
    [[0, "start", edges[first]], [W, "end", edges[first + counts.length]]].forEach(([x, anchor, v]) => {
      const t = document.createElementNS(svg.namespaceURI, "text");
      t.setAttribute("x", x); t.setAttribute("y", H + 12); t.setAttribute("text-anchor", anchor);
      t.textContent = fmt(v); svg.append(t);
    });
    return el("div", {}, el("h3", {}, "Activation histogram (log-spaced bins)"), svg);
  }
  function logitTable(r) {
    const rows = r.lp[0].map((_, k) => el("tr", {},
      el("td", { class: "l" }, chip(r.lp[0][k])), el("td", { class: "pos" }, "+" + fmt(r.lp[1][k])),
      el("td", { class: "l" }, chip(r.ln[0][k])), el("td", { class: "neg" }, fmt(r.ln[1][k]))));
    return el("div", {}, el("h3", {}, "Logit lens (decoder row · final-norm gain · unembedding)"),
      el("table", { class: "logits" }, el("tr", {}, el("th", { class: "l", colspan: 2 }, "promoted"),
        el("th", { class: "l", colspan: 2 }, "suppressed")), rows));
  }
  function steeringPanel(L, id) {
    const st = S.suite.steering, marks = L.steer && L.steer[String(id)];
    if (!st || !marks) return null;
    const items = marks.map((k) => {
      const it = st.interventions[k];
      return el("li", {}, "mode " + (it.mode || "?") + ", α = " + fmt(it.alpha ?? null) + ", positions " +
        (it.positions || "?") + ", with features " + it.features.join(", ") + (it.sae ? " (SAE " + it.sae + ")" : ""));
    });
    return el("div", { class: "panel", id: "steering" }, el("h2", {}, "Steering result"),
      el("p", { class: "muted" }, st.source), el("ul", {}, items), steeringResults());
  }
})();
