// Ledgerlake console: draws the page the URL names from the /v1 API, called with the
// session cookie (and the CSRF token on every POST). No framework, no build step.
// Every value from the API is put in the page as text (textContent), never as markup.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const main = document.getElementById("main");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

const enc = encodeURIComponent;
const consoleUrl = (...parts) => "/console/" + parts.map(enc).join("/");

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" }, ...options };
  if (init.method && init.method !== "GET") {
    init.headers = { ...init.headers, "X-CSRF-Token": csrf, "Content-Type": "application/json" };
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    location.assign("/console/sign-in?next=" + enc(location.pathname + location.hash));
    throw new ApiError(401, "session_ended", "signed out");
  }
  if (!response.ok) {
    let code = "error", message = response.statusText;
    try {
      const body = await response.json();
      code = body.error.code;
      message = body.error.message;
    } catch (_) { /* not our error shape */ }
    throw new ApiError(response.status, code, message);
  }
  return response;
}

const getJson = async (path) => (await api(path)).json();

function show(...nodes) {
  main.replaceChildren(...nodes);
}

function crumbs(...items) {
  const nav = document.getElementById("crumbs");
  nav.replaceChildren(...items.flatMap((item, i) => {
    const node = item.href ? el("a", { href: item.href, text: item.text }) : el("span", { text: item.text });
    return i ? [el("span", { class: "sep", text: "/" }), node] : [node];
  }));
}

function errorBox(error) {
  return el("p", { class: "error", role: "alert", text: `${error.message} (${error.code || "error"})` });
}

function formatBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function cell(value) {
  if (value === null || value === undefined) return el("td", { class: "null", text: "null" });
  if (typeof value === "object") return el("td", { text: JSON.stringify(value) });
  return el("td", { text: String(value) });
}

function grid(columns, rows, label) {
  const head = el("tr", {}, ...columns.map((c) => el("th", { scope: "col", text: c })));
  const body = rows.map((row) => el("tr", {}, ...row.map(cell)));
  return el("table", { class: "grid", "aria-label": label }, el("thead", {}, head), el("tbody", {}, ...body));
}

// -- the catalog: orgs, supers and tables, with a search over table names ----------

async function catalogPage() {
  crumbs({ text: "Catalog" });
  const { orgs } = await getJson("/v1/orgs");
  const entries = [];
  for (const org of orgs) {
    const { supers } = await getJson(`/v1/${enc(org.name)}/supers`);
    for (const sup of supers) {
      const { tables } = await getJson(`/v1/${enc(org.name)}/${enc(sup.name)}/tables`);
      entries.push({ org: org.name, sup: sup.name, tables });
    }
  }
  const search = el("input", { id: "search", type: "search", placeholder: "table or column name" });
  const list = el("div", { id: "catalog" });
  // Column names, fetched with the first search (one request per table, at most 500).
  const columns = new Map();
  let loading = null;
  const loadColumns = () => loading || (loading = Promise.all(entries.flatMap(({ org, sup, tables }) =>
    tables.slice(0, 500).map(async (t) => {
      try {
        const detail = await getJson(`/v1/${enc(org)}/${enc(sup)}/tables/${enc(t.name)}`);
        columns.set(`${org}/${sup}/${t.name}`, detail.columns.map((c) => c.name));
      } catch (_) { /* gone meanwhile: names only */ }
    }))).then(() => draw()));
  const draw = () => {
    const needle = search.value.trim().toLowerCase();
    if (needle && !loading) loadColumns();
    const sections = [];
    for (const { org, sup, tables } of entries) {
      const hits = (t) => (columns.get(`${org}/${sup}/${t.name}`) || []).filter((c) => c.toLowerCase().includes(needle));
      const shown = tables.filter((t) => !needle || t.name.toLowerCase().includes(needle) || hits(t).length);
      if (needle && !shown.length) continue;
      const rows = shown.map((t) => [t.name, t.row_count, t.file_count, formatBytes(t.size_bytes), t.version, t.updated_at,
        ...(needle ? [hits(t).join(", ")] : [])]);
      const table = grid(["table", "rows", "files", "size", "version", "updated", ...(needle ? ["matching columns"] : [])], rows, `Tables of ${org}/${sup}`);
      table.querySelectorAll("tbody tr").forEach((tr, i) => {
        tr.firstChild.replaceChildren(el("a", { href: consoleUrl(org, sup, "tables", shown[i].name), text: shown[i].name }));
      });
      sections.push(el("section", { class: "super" },
        el("h2", {}, `${org} / ${sup} `, el("a", { class: "action", href: consoleUrl(org, sup, "sql"), text: "SQL editor" }),
          el("a", { class: "action", href: consoleUrl(org, "events") + "?super=" + enc(sup), text: "Events" })),
        shown.length ? table : el("p", { class: "empty", text: "No tables yet." })));
    }
    list.replaceChildren(...(sections.length ? sections : [el("p", { class: "empty", text: "No table matches." })]));
  };
  search.addEventListener("input", draw);
  draw();
  show(el("h1", { text: "Catalog" }), el("label", { for: "search", text: "Search tables and columns" }), search,
    entries.length ? list : el("p", { class: "empty", text: "Nothing here yet: write rows through the API first." }));
}

// -- a table: schema, statistics, mirrors and a sample ------------------------------

async function tablePage(org, sup, name) {
  crumbs({ text: "Catalog", href: "/console" }, { text: `${org} / ${sup}`, href: consoleUrl(org, sup, "sql") }, { text: name });
  const t = await getJson(`/v1/${enc(org)}/${enc(sup)}/tables/${enc(name)}`);
  const stats = t.stats || {};
  const schema = grid(["column", "type", "nulls", "min", "max"],
    t.columns.map((c) => [c.name, c.type, stats[c.name]?.null_count ?? null, stats[c.name]?.min ?? null, stats[c.name]?.max ?? null]),
    "Schema");
  const facts = el("dl", { class: "facts" },
    el("dt", { text: "Rows" }), el("dd", { text: String(t.row_count ?? "—") }),
    el("dt", { text: "Files" }), el("dd", { text: String(t.file_count ?? "—") }),
    el("dt", { text: "Size" }), el("dd", { text: formatBytes(t.size_bytes) }),
    el("dt", { text: "Version" }), el("dd", { text: String(t.version) }),
    el("dt", { text: "Updated" }), el("dd", { text: `${t.updated_at} by ${t.updated_by}` }));
  const mirrors = grid(["format", "enabled", "version", "lag (versions)", "location", "error"],
    (t.mirrors || []).map((m) => [m.format, m.enabled, m.version, m.lag_versions, m.location, m.error]), "Mirrors");
  const sample = el("div", {}, el("p", { text: "Loading a sample…" }));
  show(el("h1", { text: name }), facts, el("h2", { text: "Schema" }), schema,
    el("h2", { text: "Mirrors" }), mirrors, useFrom(org, sup, name, t.mirrors || []),
    el("h2", { text: "Sample" }), sample,
    el("p", { class: "links" },
      el("a", { href: consoleUrl(org, sup, "sql") + "#" + enc(`select * from "${name}" limit 100`), text: "Query this table" }),
      el("a", { href: consoleUrl(org, sup, "tables", name, "history"), text: "History" }),
      el("a", { href: consoleUrl(org, "events") + "?super=" + enc(sup) + "&table=" + enc(name), text: "Events" })));
  try {
    const result = await runQuery(org, sup, `select * from "${name.replaceAll('"', '""')}"`, 20, 0);
    sample.replaceChildren(grid(result.columns.map((c) => c.name), result.rows, "Sample"));
  } catch (error) {
    sample.replaceChildren(errorBox(error));
  }
}

// What to paste into Spark, Trino, DuckDB or pyiceberg to read the table's mirrors.
function useFrom(org, sup, name, mirrors) {
  const origin = location.origin;
  const delta = mirrors.find((m) => m.format === "delta" && m.enabled && m.location);
  const iceberg = mirrors.find((m) => m.format === "iceberg" && m.enabled);
  if (!delta && !iceberg) return el("p", { class: "hint", text: "No mirror is published for this table." });
  const snippets = [];
  if (iceberg) {
    snippets.push(
      ["Spark (Iceberg REST catalog)", `spark.sql.catalog.ll=org.apache.iceberg.spark.SparkCatalog\nspark.sql.catalog.ll.type=rest\nspark.sql.catalog.ll.uri=${origin}/iceberg\nspark.sql.catalog.ll.token=<token>\n\nSELECT * FROM ll.${org}.${sup}.${name};`],
      ["Trino (Iceberg REST connector)", `connector.name=iceberg\niceberg.catalog.type=rest\niceberg.rest-catalog.uri=${origin}/iceberg\niceberg.rest-catalog.warehouse=${org}\niceberg.rest-catalog.security=OAUTH2\niceberg.rest-catalog.oauth2.token=<token>\n\nSELECT * FROM ledgerlake.${sup}.${name};`],
      ["pyiceberg", `from pyiceberg.catalog import load_catalog\n\ncatalog = load_catalog("ll", type="rest", uri="${origin}/iceberg", token="<token>")\ncatalog.load_table("${org}.${sup}.${name}").scan().to_arrow()`],
      ["DuckDB (Iceberg)", `CREATE SECRET ll_token (TYPE iceberg, TOKEN '<token>');\nATTACH '${org}' AS ll (TYPE iceberg, ENDPOINT '${origin}/iceberg', SECRET ll_token);\nSELECT * FROM ll.${sup}.${name};`]);
  }
  if (delta) {
    snippets.push(
      ["Spark (Delta)", `SELECT * FROM delta.\`${delta.location}\`;`],
      ["DuckDB (Delta)", `SELECT * FROM delta_scan('${delta.location}');`]);
  }
  return el("details", { class: "use-from" }, el("summary", { text: "Read it from Spark, Trino, DuckDB or Python" }),
    ...snippets.flatMap(([title, text]) => [el("h3", { text: title }), el("pre", { class: "plan", "aria-label": title, text })]));
}

// -- the SQL editor -----------------------------------------------------------------

async function runQuery(org, sup, sql, limit, offset, accept, asOf, signal) {
  const response = await api(`/v1/${enc(org)}/${enc(sup)}/query`, {
    method: "POST",
    headers: accept ? { Accept: accept } : {},
    body: JSON.stringify({ sql, limit, offset, ...(asOf || {}) }),
    signal,
  });
  return accept ? response.blob() : response.json();
}

// A results grid whose column headers sort the rows shown (click, or Enter on one).
function sortableGrid(columns, rows, label) {
  const table = grid(columns, rows, label);
  const trs = [...table.querySelector("tbody").children];  // in the rows' order
  let by = -1, ascending = true;
  table.querySelectorAll("thead th").forEach((th, i) => {
    const button = el("button", { type: "button", class: "sort", text: th.textContent });
    th.replaceChildren(button);
    th.setAttribute("aria-sort", "none");
    button.addEventListener("click", () => {
      ascending = by === i ? !ascending : true;
      by = i;
      const order = rows.map((row, n) => [row[i], n]).sort(([x], [y]) => {
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * (ascending ? 1 : -1);
      });
      const body = table.querySelector("tbody");
      body.replaceChildren(...order.map(([, n]) => trs[n]));
      table.querySelectorAll("thead th").forEach((other) => other.setAttribute("aria-sort", "none"));
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    });
  });
  return table;
}

// -- charts of a result: bar, line or scatter, drawn as SVG (no library) ------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, String(value));
  }
  node.append(...children);
  return node;
}

function chartControls(result) {
  const names = result.columns.map((c) => c.name);
  const numeric = result.columns.map((c, i) => result.rows.some((r) => typeof r[i] === "number"));
  const yDefault = numeric.lastIndexOf(true);
  if (yDefault < 0 || !result.rows.length) return el("div");
  const pick = (id, label, chosen) => {
    const select = el("select", { id }, ...names.map((n, i) => el("option", { value: String(i), text: n })));
    select.value = String(chosen);
    return [el("label", { for: id, text: label }), select];
  };
  const [xLabel, xBox] = pick("chart-x", "X axis", yDefault === 0 ? 0 : 0);
  const [yLabel, yBox] = pick("chart-y", "Y axis", yDefault);
  const area = el("div", { class: "chart" });
  const draw = (kind) => area.replaceChildren(chart(kind, result, Number(xBox.value), Number(yBox.value)));
  return el("div", {},
    el("div", { class: "controls" }, xLabel, xBox, yLabel, yBox,
      ...["bar", "line", "scatter"].map((kind) => el("button", { type: "button", text: `${kind[0].toUpperCase()}${kind.slice(1)} chart`, onclick: () => draw(kind) }))),
    area);
}

function chart(kind, result, xi, yi) {
  const width = 640, height = 320, left = 56, bottom = 40, top = 12, right = 12;
  const points = result.rows.filter((r) => typeof r[yi] === "number");
  const ys = points.map((r) => r[yi]);
  const low = Math.min(0, ...ys), high = Math.max(...ys, low + 1);
  const y = (v) => top + (height - top - bottom) * (1 - (v - low) / (high - low));
  const numericX = kind !== "bar" && points.every((r) => typeof r[xi] === "number");
  const xs = points.map((r, i) => (numericX ? r[xi] : i));
  const xLow = Math.min(...xs), xHigh = Math.max(...xs, xLow + 1);
  const x = (v) => left + (width - left - right) * (kind === "bar" ? (v + 0.5) / points.length : (v - xLow) / (xHigh - xLow));
  const label = `${kind} chart of ${result.columns[yi].name} by ${result.columns[xi].name}`;
  const node = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label, class: "chart-svg" });
  node.append(svg("line", { x1: left, y1: y(low), x2: width - right, y2: y(low), class: "axis" }),
    svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" }),
    svg("text", { x: left - 6, y: y(high) + 4, "text-anchor": "end", text: String(high) }),
    svg("text", { x: left - 6, y: y(low) + 4, "text-anchor": "end", text: String(low) }));
  if (kind === "bar") {
    const w = Math.max(1, ((width - left - right) / points.length) * 0.7);
    points.forEach((r, i) => {
      node.append(svg("rect", { x: x(i) - w / 2, y: Math.min(y(r[yi]), y(0)), width: w, height: Math.abs(y(0) - y(r[yi])), class: "bar" },
        svg("title", { text: `${r[xi]}: ${r[yi]}` })));
      if (points.length <= 30) node.append(svg("text", { x: x(i), y: height - bottom + 16, "text-anchor": "middle", text: String(r[xi]) }));
    });
  } else {
    const coords = points.map((r, i) => [x(xs[i]), y(r[yi])]);
    if (kind === "line") node.append(svg("polyline", { points: coords.map((c) => c.join(",")).join(" "), class: "line" }));
    coords.forEach(([cx, cy], i) => node.append(svg("circle", { cx, cy, r: 3, class: "dot" },
      svg("title", { text: `${points[i][xi]}: ${points[i][yi]}` }))));
  }
  return node;
}

function saveBlob(blob, name) {
  const link = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(link);
  link.click();
  link.remove();
}

function sqlPage(org, sup) {
  crumbs({ text: "Catalog", href: "/console" }, { text: `${org} / ${sup}` }, { text: "SQL" });
  const initial = decodeURIComponent(location.hash.slice(1)) || "select 1";
  const editor = el("textarea", { id: "sql", rows: "8", spellcheck: "false" });
  editor.value = initial;
  const limitBox = el("input", { id: "limit", type: "number", min: "1", max: "100000", value: "100" });
  const versionBox = el("input", { id: "as-of-version", type: "number", min: "0", placeholder: "current" });
  const timeBox = el("input", { id: "as-of-time", type: "text", placeholder: "2026-01-31T12:00:00Z" });
  const output = el("div", { id: "results", "aria-live": "polite" });
  const status = el("p", { id: "status", class: "status" });
  const cancel = el("button", { type: "button", text: "Cancel", disabled: "" });
  let offset = 0, running = null;

  function asOf() {
    const out = {};
    if (versionBox.value !== "") out.as_of_version = Number(versionBox.value);
    if (timeBox.value.trim()) out.as_of_time = timeBox.value.trim();
    return out;
  }

  async function run(at = 0) {
    offset = at;
    const sql = editor.value;
    history.replaceState(null, "", "#" + enc(sql));
    status.textContent = "Running…";
    running = new AbortController();
    cancel.removeAttribute("disabled");
    try {
      const limit = Number(limitBox.value) || 100;
      const result = await runQuery(org, sup, sql, limit, offset, null, asOf(), running.signal);
      const pager = el("div", { class: "pager" },
        el("button", { type: "button", text: "Previous page", ...(offset ? {} : { disabled: "" }), onclick: () => run(Math.max(0, offset - limit)) }),
        el("button", { type: "button", text: "Next page", ...(result.truncated ? {} : { disabled: "" }), onclick: () => run(offset + limit) }));
      output.replaceChildren(sortableGrid(result.columns.map((c) => c.name), result.rows, "Results"), pager,
        chartControls(result));
      status.textContent = `${result.row_count} row${result.row_count === 1 ? "" : "s"} from row ${offset + 1}` +
        `${result.truncated ? " (more follow)" : ""} in ${result.elapsed_ms} ms`;
    } catch (error) {
      status.textContent = error.name === "AbortError" ? "Cancelled." : "";
      if (error.name !== "AbortError") output.replaceChildren(errorBox(error));
    } finally {
      running = null;
      cancel.setAttribute("disabled", "");
    }
  }

  async function plan() {
    try {
      const response = await api(`/v1/${enc(org)}/${enc(sup)}/query/validate`, {
        method: "POST", body: JSON.stringify({ sql: editor.value, ...asOf() }),
      });
      const checked = await response.json();
      output.replaceChildren(
        el("h2", { text: "Plan" }),
        el("p", { text: `Reads ${checked.tables.join(", ") || "no table"}; returns ${checked.columns.map((c) => `${c.name} ${c.type}`).join(", ")}.` }),
        el("pre", { class: "plan", "aria-label": "Plan", text: checked.plan }));
      status.textContent = "Valid.";
    } catch (error) {
      status.textContent = "";
      output.replaceChildren(errorBox(error));
    }
  }

  async function download(accept, name) {
    try {
      saveBlob(await runQuery(org, sup, editor.value, Number(limitBox.value) || 100, 0, accept, asOf()), name);
    } catch (error) {
      output.replaceChildren(errorBox(error));
    }
  }

  cancel.addEventListener("click", () => running && running.abort());
  editor.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      run(0);
    }
  });
  show(el("h1", { text: `SQL on ${org} / ${sup}` }),
    el("label", { for: "sql", text: "SQL" }), editor,
    el("div", { class: "controls" },
      el("label", { for: "limit", text: "Rows per page" }), limitBox,
      el("label", { for: "as-of-version", text: "As of version" }), versionBox,
      el("label", { for: "as-of-time", text: "As of time" }), timeBox),
    el("div", { class: "controls" },
      el("button", { type: "button", text: "Run", onclick: () => run(0) }), cancel,
      el("button", { type: "button", text: "Plan", onclick: plan }),
      el("button", { type: "button", text: "Download CSV", onclick: () => download("text/csv", "result.csv") }),
      el("button", { type: "button", text: "Download Arrow", onclick: () => download("application/vnd.apache.arrow.stream", "result.arrow") }),
      el("span", { class: "hint", text: "Ctrl+Enter runs" })),
    status, output);
  editor.focus();
}

// -- a table's history: its versions, a past version's rows, restore ---------------

async function historyPage(org, sup, name) {
  crumbs({ text: "Catalog", href: "/console" }, { text: `${org} / ${sup}`, href: consoleUrl(org, sup, "sql") },
    { text: name, href: consoleUrl(org, sup, "tables", name) }, { text: "History" });
  const entries = [];
  let after = "0-0";
  for (let i = 0; i < 20; i++) {
    const page = await getJson(`/v1/${enc(org)}/${enc(sup)}/tables/${enc(name)}/history?after=${enc(after)}&limit=1000`);
    entries.push(...page.entries);
    if (!page.next_after) break;
    after = page.next_after;
  }
  entries.reverse();  // newest first
  const current = entries.length ? entries[0].version : 0;
  const rows = entries.map((e) => [e.version, e.event_type, e.actor, e.time, e.rows_added, e.rows_removed, (e.columns_added || []).join(", ")]);
  const timeline = grid(["version", "event", "actor", "time", "rows added", "rows removed", "columns added"], rows, "Versions");
  const preview = el("div", { id: "preview" });
  timeline.querySelectorAll("tbody tr").forEach((tr, i) => {
    const version = entries[i].version;
    const actions = el("td", {},
      el("button", { type: "button", class: "link", text: `Open version ${version}`, onclick: () => openVersion(version) }),
      version === current ? null : el("button", { type: "button", class: "link", text: `Restore version ${version}`, onclick: () => restore(version) }));
    tr.append(actions);
  });
  timeline.querySelector("thead tr").append(el("th", { scope: "col", text: "actions" }));

  async function openVersion(version) {
    try {
      const result = await runQuery(org, sup, `select * from "${name.replaceAll('"', '""')}"`, 100, 0, null, { as_of_version: version });
      preview.replaceChildren(el("h2", { text: `Version ${version}` }), grid(result.columns.map((c) => c.name), result.rows, `Rows of version ${version}`));
    } catch (error) {
      preview.replaceChildren(errorBox(error));
    }
  }

  async function restore(version) {
    if (!confirm(`Make version ${version} of ${name} current again (as a new version)?`)) return;
    try {
      const response = await api(`/v1/${enc(org)}/${enc(sup)}/tables/${enc(name)}/restore`, {
        method: "POST", body: JSON.stringify({ version }),
      });
      const done = await response.json();
      await historyPage(org, sup, name);
      main.prepend(el("p", { class: "notice", role: "status", text: `Restored version ${version} as version ${done.version}.` }));
    } catch (error) {
      preview.replaceChildren(errorBox(error));
    }
  }

  show(el("h1", { text: `History of ${name}` }), timeline, preview);
}

// -- events: an org's log (of a super or table), following new ones live ------------

async function eventsPage(org) {
  const params = new URLSearchParams(location.search);
  const sup = params.get("super"), table = params.get("table");
  crumbs({ text: "Catalog", href: "/console" }, { text: org }, { text: "Events" });
  const scope = new URLSearchParams({ org });
  if (sup) scope.set("super", sup);
  if (table) scope.set("table", table);
  // The last day's events, newest first, then every new one as it is appended.
  const since = `${Date.now() - 86400000}-0`;
  const page = await getJson(`/v1/events?${scope}&after=${enc(since)}&limit=1000`);
  const typeBox = el("input", { id: "type-filter", type: "search", placeholder: "RowsAppended" });
  const actorBox = el("input", { id: "actor-filter", type: "search", placeholder: "principal id" });
  const body = el("tbody");
  const live = el("p", { id: "live", class: "status", role: "status", text: "Connecting…" });
  const head = el("tr", {}, ...["time", "event", "super", "table", "version", "actor", "rows"].map((c) => el("th", { scope: "col", text: c })));
  const table_ = el("table", { class: "grid", "aria-label": "Events" }, el("thead", {}, head), body);
  const matches = (e) => (!typeBox.value || e.type.toLowerCase().includes(typeBox.value.toLowerCase())) &&
    (!actorBox.value || String(e.actor).includes(actorBox.value));
  const add = (e) => {
    const tr = el("tr", {}, ...[e.time, e.type, e.super || "", e.table || "", e.version ?? "", e.actor, e.rows ?? e.rows_removed ?? ""].map(cell));
    tr.dataset.type = e.type;
    tr.dataset.actor = e.actor;
    tr.hidden = !matches(e);
    body.prepend(tr);
  };
  page.events.forEach(add);
  const refilter = () => body.querySelectorAll("tr").forEach((tr) => { tr.hidden = !matches(tr.dataset); });
  typeBox.addEventListener("input", refilter);
  actorBox.addEventListener("input", refilter);
  const last = page.events.length ? page.events[page.events.length - 1] : null;
  const from = last ? (sup ? last.id : `${last.id}@${last.super}`) : "$";
  const source = new EventSource(`/v1/events/stream?${scope}&after=${enc(from)}`);
  source.addEventListener("open", () => { live.textContent = "Following new events live."; });
  source.addEventListener("event", (message) => add(JSON.parse(message.data)));
  source.addEventListener("error", () => { live.textContent = "Reconnecting…"; });
  window.addEventListener("pagehide", () => source.close());
  show(el("h1", { text: `Events of ${[org, sup, table].filter(Boolean).join(" / ")}` }),
    el("div", { class: "controls" }, el("label", { for: "type-filter", text: "Event type" }), typeBox,
      el("label", { for: "actor-filter", text: "Actor" }), actorBox),
    live, table_);
}

// -- admin: principals and their tokens (for org and platform admins) --------------

async function adminPage() {
  crumbs({ text: "Catalog", href: "/console" }, { text: "Admin" });
  const me = await getJson("/v1/whoami");
  const [principals, grants] = await Promise.all([getJson("/v1/principals"), getJson("/v1/grants")]);
  const managed = principals.filter((p) => me.principal.admin || (p.org && me.grants.some((g) => g.role === "org_admin" && g.org === p.org && !g.super)));
  if (!managed.length && !me.principal.admin) {
    show(el("h1", { text: "Not found" }), el("p", { text: "No console page has this address." }));
    return;
  }
  const list = el("div");
  for (const p of managed) {
    const tokens = await getJson(`/v1/principals/${enc(p.id)}/tokens`);
    const rows = tokens.map((t) => [t.name || "(unnamed)", t.id, t.created_at, t.expires_at, t.revoked ? "revoked" : "active"]);
    const tokenGrid = grid(["token", "id", "created", "expires", "state"], rows, `Tokens of ${p.name}`);
    tokenGrid.querySelector("thead tr").append(el("th", { scope: "col", text: "actions" }));
    tokenGrid.querySelectorAll("tbody tr").forEach((tr, i) => {
      const t = tokens[i];
      tr.append(el("td", {}, t.revoked ? null : el("button", { type: "button", class: "link", text: `Revoke ${t.name || t.id}`,
        onclick: async () => {
          if (!confirm(`Revoke the token ${t.name || t.id} of ${p.name}? It stops working at once.`)) return;
          await api(`/v1/tokens/${enc(t.id)}`, { method: "DELETE" });
          adminPage();
        } })));
    });
    const nameBox = el("input", { id: `token-name-${p.id}`, type: "text", placeholder: "laptop" });
    const issued = el("div", { role: "status" });
    const issue = el("button", { type: "button", text: `Issue a token for ${p.name}`, onclick: async () => {
      const response = await api(`/v1/principals/${enc(p.id)}/tokens`, { method: "POST", body: JSON.stringify({ name: nameBox.value }) });
      const made = await response.json();
      await adminPage();
      main.prepend(el("div", { class: "notice", role: "status" },
        el("p", { text: `New token for ${p.name} (shown once: copy it now):` }),
        el("output", { class: "secret", "aria-label": "New token", text: made.token })));
    } });
    list.append(el("section", { class: "principal" },
      el("h2", { text: `${p.name} (${p.kind}${p.org ? `, ${p.org}` : ""}${p.admin ? ", platform admin" : ""}${p.disabled ? ", disabled" : ""})` }),
      tokenGrid,
      el("div", { class: "controls" }, el("label", { for: `token-name-${p.id}`, text: `Name of a new token for ${p.name}` }), nameBox, issue), issued,
      p.org ? grantsOf(p, grants.filter((g) => g.principal_id === p.id)) : null));
  }
  const extra = [];
  if (me.principal.admin) {
    const [config, health] = await Promise.all([getJson("/v1/config"), (await fetch("/health")).json()]);
    extra.push(el("h2", { text: "Effective settings" }),
      grid(["setting", "value"], Object.entries(config).map(([k, v]) => [k, v]), "Settings"),
      el("h2", { text: "Health" }), el("pre", { class: "plan", "aria-label": "Health", text: JSON.stringify(health, null, 2) }));
  }
  show(el("h1", { text: "Principals, tokens and grants" }), list, ...extra);
}

// A principal's grants, each removable, and a form to add one in its org.
function grantsOf(p, grants) {
  const rows = grants.map((g) => [g.role, g.org, g.super || "(every super)", g.table || "(every table)"]);
  const table = grid(["role", "org", "super", "table"], rows, `Grants of ${p.name}`);
  table.querySelector("thead tr").append(el("th", { scope: "col", text: "actions" }));
  table.querySelectorAll("tbody tr").forEach((tr, i) => {
    const g = grants[i];
    tr.append(el("td", {}, el("button", { type: "button", class: "link", text: `Remove ${g.role} on ${[g.org, g.super, g.table].filter(Boolean).join("/")}`,
      onclick: async () => {
        if (!confirm(`Remove the grant ${g.role} of ${p.name}?`)) return;
        await api(`/v1/grants/${enc(g.id)}`, { method: "DELETE" });
        adminPage();
      } })));
  });
  const role = el("select", { id: `grant-role-${p.id}` }, ...["reader", "writer", "org_admin"].map((r) => el("option", { value: r, text: r })));
  const sup = el("input", { id: `grant-super-${p.id}`, type: "text", placeholder: "every super" });
  const tbl = el("input", { id: `grant-table-${p.id}`, type: "text", placeholder: "every table" });
  const problem = el("div");
  const add = el("button", { type: "button", text: `Add the grant for ${p.name}`, onclick: async () => {
    const body = { principal_id: p.id, role: role.value, org: p.org };
    if (sup.value.trim()) body.super = sup.value.trim();
    if (tbl.value.trim()) body.table = tbl.value.trim();
    try {
      await api("/v1/grants", { method: "POST", body: JSON.stringify(body) });
      adminPage();
    } catch (error) {
      problem.replaceChildren(errorBox(error));
    }
  } });
  return el("div", { class: "grants" }, table,
    el("div", { class: "controls" },
      el("label", { for: role.id, text: `Role for ${p.name}` }), role,
      el("label", { for: sup.id, text: `Super for ${p.name}` }), sup,
      el("label", { for: tbl.id, text: `Table for ${p.name}` }), tbl, add), problem);
}

// -- routing ------------------------------------------------------------------------

async function route() {
  const parts = location.pathname.replace(/^\/console\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  try {
    if (parts.length === 0) return await catalogPage();
    if (parts.length === 1 && parts[0] === "admin") return await adminPage();
    if (parts.length === 2 && parts[1] === "events") return await eventsPage(parts[0]);
    if (parts.length === 4 && parts[2] === "tables") return await tablePage(parts[0], parts[1], parts[3]);
    if (parts.length === 5 && parts[2] === "tables" && parts[4] === "history") return await historyPage(parts[0], parts[1], parts[3]);
    if (parts.length === 3 && parts[2] === "sql") return sqlPage(parts[0], parts[1]);
    crumbs({ text: "Catalog", href: "/console" });
    show(el("h1", { text: "Not found" }), el("p", { text: "No console page has this address." }));
  } catch (error) {
    if (error.status !== 401) show(errorBox(error));
  }
}

route();
