// An A2UI v0.9 renderer for the basic catalog (and CAR's six additions).
//
// A surface is {surfaceId, components: [{id, component, ...props}],
// dataModel, sendDataModel}.  Rendering starts at the component "root".
// Property values are literals or data bindings {path} (a JSON Pointer;
// a relative one resolves inside the item a List/Row/Column template is
// drawing).  Inputs write what the person enters back into the surface's
// local data model; a Button resolves its action's context against it and
// hands {name, surfaceId, sourceComponentId, timestamp, context} to the
// page, which sends it as a2ui.action.
//
// Every string from the surface lands in the DOM through textContent or a
// property (value, src of data: images only): surface text is untrusted.

const MAX_DEPTH = 64;
const HEADINGS = { h1: "h1", h2: "h2", h3: "h3", h4: "h4", h5: "h5" };

function clone(value) {
  return value === undefined ? undefined : JSON.parse(JSON.stringify(value));
}

function unescapeToken(token) {
  return token.replace(/~1/g, "/").replace(/~0/g, "~");
}

export function pointerTokens(pointer) {
  if (pointer === "" || pointer === "/") return [];
  return pointer.replace(/^\//, "").split("/").map(unescapeToken);
}

export function joinPointer(scope, path) {
  if (typeof path !== "string") return scope;
  if (path.startsWith("/")) return path;
  if (path === "" || path === ".") return scope;
  const base = scope === "/" ? "" : scope.replace(/\/$/, "");
  return `${base}/${path.replace(/^\.\//, "")}`;
}

export function getAt(model, pointer) {
  let node = model;
  for (const token of pointerTokens(pointer)) {
    if (node === null || typeof node !== "object") return undefined;
    node = Array.isArray(node) ? node[Number(token)] : node[token];
  }
  return node;
}

export function setAt(model, pointer, value) {
  const tokens = pointerTokens(pointer);
  if (tokens.length === 0) return value;
  let node = model;
  tokens.forEach((token, i) => {
    const last = i === tokens.length - 1;
    const key = Array.isArray(node) ? Number(token) : token;
    if (last) {
      node[key] = value;
      return;
    }
    if (node[key] === null || typeof node[key] !== "object") node[key] = /^\d+$/.test(tokens[i + 1]) ? [] : {};
    node = node[key];
  });
  return model;
}

function asText(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") return value;
  if (typeof value === "number" || typeof value === "boolean") return String(value);
  try {
    return JSON.stringify(value);
  } catch (_) {
    return "";
  }
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function word(value) {
  return typeof value === "string" ? value.replace(/[^A-Za-z0-9_-]/g, "").slice(0, 32) : "";
}

export class SurfaceView {
  constructor(surface, { onAction }) {
    this.onAction = onAction;
    this.tabState = new Map();
    this.element = el("div", "a2-surface");
    this.update(surface);
  }

  update(surface) {
    this.surface = surface;
    this.surfaceId = surface.surfaceId;
    this.model = clone(surface.dataModel) ?? {};
    this.components = new Map();
    for (const component of Array.isArray(surface.components) ? surface.components : []) {
      if (component && typeof component.id === "string") this.components.set(component.id, component);
    }
    this.render();
  }

  render() {
    const root = this.components.has("root") ? this.node("root", "/", 0, new Set()) : el("p", "a2-missing", "this surface has no root component");
    this.element.replaceChildren(root);
  }

  // -- values ----------------------------------------------------------------------------

  resolve(value, scope) {
    if (value === undefined || value === null) return undefined;
    if (typeof value !== "object") return value;
    if (Array.isArray(value)) return value.map((item) => this.resolve(item, scope));
    const literal = ["literalString", "literalNumber", "literalBoolean", "literalArray"].find((k) => k in value);
    if (typeof value.path === "string") {
      const found = getAt(this.model, joinPointer(scope, value.path));
      return found === undefined && literal ? value[literal] : found;
    }
    if (literal) return value[literal];
    if (typeof value.call === "string") return undefined; // client functions are not evaluated here
    return value;
  }

  boundPath(value, scope) {
    return value && typeof value === "object" && typeof value.path === "string" ? joinPointer(scope, value.path) : null;
  }

  write(pointer, value) {
    if (pointer === null) return;
    const result = setAt(this.model, pointer, value);
    if (pointer === "/" || pointer === "") this.model = result;
  }

  // -- the tree -------------------------------------------------------------------------

  node(id, scope, depth, stack) {
    if (depth > MAX_DEPTH || stack.has(id)) return el("span", "a2-missing", `[${id}: too deep]`);
    const component = this.components.get(id);
    if (!component) return el("span", "a2-missing", `[missing component ${id}]`);
    let type = component.component;
    let props = component;
    if (type && typeof type === "object") {
      // The v0.8 spelling: {"component": {"Text": {...}}}.
      const [name] = Object.keys(type);
      props = type[name] || {};
      type = name;
    }
    const draw = RENDERERS[type];
    const inner = new Set(stack).add(id);
    const ctx = { id, scope, depth, stack: inner };
    let node;
    try {
      node = draw ? draw.call(this, props, ctx) : el("span", "a2-unsupported", `[${asText(type)}]`);
    } catch (err) {
      node = el("span", "a2-missing", `[${id}: ${err.message}]`);
    }
    node.dataset.componentId = id;
    node.dataset.component = asText(type);
    node.classList.add("a2", `a2-${word(asText(type)).toLowerCase()}`);
    if (typeof props.weight === "number" && props.weight > 0) node.style.flexGrow = String(props.weight);
    return node;
  }

  child(childId, ctx) {
    return typeof childId === "string" ? this.node(childId, ctx.scope, ctx.depth + 1, ctx.stack) : el("span");
  }

  children(list, ctx) {
    if (Array.isArray(list)) return list.map((id) => this.child(id, ctx));
    if (!list || typeof list !== "object") return [];
    if (Array.isArray(list.explicitList)) return this.children(list.explicitList, ctx);
    const template = list.template && typeof list.template === "object" ? list.template : list;
    const componentId = template.componentId;
    const path = template.path ?? template.dataBinding;
    if (typeof componentId !== "string" || typeof path !== "string") return [];
    const base = joinPointer(ctx.scope, path);
    const items = getAt(this.model, base);
    const keys = Array.isArray(items) ? items.map((_, i) => String(i)) : items && typeof items === "object" ? Object.keys(items) : [];
    return keys.slice(0, 1000).map((key) =>
      this.node(componentId, `${base === "/" ? "" : base}/${key.replace(/~/g, "~0").replace(/\//g, "~1")}`, ctx.depth + 1, ctx.stack));
  }

  text(value, ctx) {
    return asText(this.resolve(value, ctx.scope));
  }

  // -- actions --------------------------------------------------------------------------

  fire(props, ctx, button) {
    const action = props.action;
    if (!action || typeof action !== "object") return;
    let name = null;
    let context = null;
    if (action.event && typeof action.event === "object") {
      name = action.event.name;
      context = action.event.context;
    } else if (typeof action.name === "string") {
      name = action.name;
      context = action.context;
    }
    if (typeof name !== "string" || !name) return;
    const resolved = {};
    if (Array.isArray(context)) {
      for (const item of context) {
        if (item && typeof item.key === "string") resolved[item.key] = this.resolve(item.value, ctx.scope) ?? null;
      }
    } else if (context && typeof context === "object") {
      for (const [key, value] of Object.entries(context)) resolved[key] = this.resolve(value, ctx.scope) ?? null;
    }
    const sent = {
      name,
      surfaceId: this.surfaceId,
      sourceComponentId: ctx.id,
      timestamp: new Date().toISOString(),
      context: resolved,
    };
    if (this.surface.sendDataModel === true) {
      const model = JSON.stringify(this.model);
      if (model.length <= 32 * 1024) sent.dataModel = clone(this.model);
    }
    this.onAction(sent, button);
  }
}

function labelled(view, props, ctx, control) {
  const wrap = el("label", "a2-field");
  const text = view.text(props.label, ctx);
  if (text) wrap.appendChild(el("span", "a2-label", text));
  wrap.appendChild(control);
  return wrap;
}

function bars(values) {
  const NS = "http://www.w3.org/2000/svg";
  const root = document.createElementNS(NS, "svg");
  root.setAttribute("viewBox", "0 0 300 100");
  const points = values.map((v) => (typeof v === "number" ? { label: "", value: v } : {
    label: asText(v && (v.label ?? v.name ?? v.x)), value: Number(v && (v.value ?? v.y)),
  })).filter((p) => Number.isFinite(p.value)).slice(0, 200);
  const max = Math.max(1e-9, ...points.map((p) => Math.abs(p.value)));
  const slot = 300 / Math.max(1, points.length);
  points.forEach((p, i) => {
    const h = (86 * Math.abs(p.value)) / max;
    const rect = document.createElementNS(NS, "rect");
    rect.setAttribute("x", String(i * slot + 1));
    rect.setAttribute("y", String(90 - h));
    rect.setAttribute("width", String(Math.max(1, slot - 2)));
    rect.setAttribute("height", String(Math.max(1, h)));
    rect.setAttribute("class", "a2-chart-bar");
    const title = document.createElementNS(NS, "title");
    title.textContent = `${p.label} ${p.value}`.trim();
    rect.appendChild(title);
    root.appendChild(rect);
  });
  return root;
}

// Each renderer runs with `this` the SurfaceView.
const RENDERERS = {
  Text(props, ctx) {
    const variant = props.variant ?? props.usageHint;
    const tag = HEADINGS[variant] || (variant === "caption" ? "small" : "p");
    return el(tag, variant ? `a2-text-${word(variant)}` : "", this.text(props.text, ctx));
  },
  Row(props, ctx) {
    return flex.call(this, "a2-row", props, ctx);
  },
  Column(props, ctx) {
    return flex.call(this, "a2-column", props, ctx);
  },
  List(props, ctx) {
    const list = el("div", props.direction === "horizontal" ? "a2-list-horizontal" : "a2-list-vertical");
    for (const item of this.children(props.children, ctx)) {
      const row = el("div", "a2-list-item");
      row.appendChild(item);
      list.appendChild(row);
    }
    return list;
  },
  Card(props, ctx) {
    const card = el("div", "a2-card-body");
    if (props.child) card.appendChild(this.child(props.child, ctx));
    return card;
  },
  Divider(props) {
    return el(props.axis === "vertical" ? "span" : "hr", props.axis === "vertical" ? "a2-divider-vertical" : "");
  },
  Button(props, ctx) {
    const button = el("button", `a2-button-${word(props.variant ?? (props.primary ? "primary" : "default")) || "default"}`);
    button.type = "button";
    if (props.child) button.appendChild(this.child(props.child, ctx));
    else button.textContent = this.text(props.label ?? props.text, ctx) || "Button";
    button.addEventListener("click", () => this.fire(props, ctx, button));
    return button;
  },
  TextField(props, ctx) {
    const valueProp = props.value ?? props.text;
    const path = this.boundPath(valueProp, ctx.scope);
    const variant = props.variant ?? props.textFieldType;
    const input = variant === "longText" ? el("textarea") : el("input");
    if (input.tagName === "INPUT") {
      input.type = variant === "number" ? "number" : variant === "obscured" ? "password" : variant === "date" ? "date" : "text";
    }
    input.value = asText(this.resolve(valueProp, ctx.scope));
    const placeholder = this.text(props.placeholder, ctx);
    if (placeholder) input.placeholder = placeholder;
    input.addEventListener("input", () => {
      this.write(path, variant === "number" && input.value !== "" ? Number(input.value) : input.value);
    });
    return labelled(this, props, ctx, input);
  },
  CheckBox(props, ctx) {
    const path = this.boundPath(props.value, ctx.scope);
    const box = el("input");
    box.type = "checkbox";
    box.checked = this.resolve(props.value, ctx.scope) === true;
    box.addEventListener("change", () => this.write(path, box.checked));
    const wrap = el("label", "a2-check");
    wrap.appendChild(box);
    wrap.appendChild(el("span", "a2-label", this.text(props.label, ctx)));
    return wrap;
  },
  ChoicePicker(props, ctx) {
    return choice.call(this, props, ctx, props.variant === "multipleSelection" || props.maxAllowedSelections > 1);
  },
  Select(props, ctx) {
    return choice.call(this, props, ctx, props.multiple === true);
  },
  Slider(props, ctx) {
    const path = this.boundPath(props.value, ctx.scope);
    const input = el("input");
    input.type = "range";
    input.min = String(props.min ?? props.minValue ?? 0);
    input.max = String(props.max ?? props.maxValue ?? 100);
    if (typeof props.step === "number") input.step = String(props.step);
    const current = this.resolve(props.value, ctx.scope);
    if (typeof current === "number") input.value = String(current);
    const shown = el("output", "a2-slider-value", input.value);
    input.addEventListener("input", () => {
      shown.textContent = input.value;
      this.write(path, Number(input.value));
    });
    const wrap = labelled(this, props, ctx, input);
    wrap.appendChild(shown);
    return wrap;
  },
  DateTimeInput(props, ctx) {
    const path = this.boundPath(props.value, ctx.scope);
    const input = el("input");
    const date = props.enableDate !== false;
    const time = props.enableTime === true;
    input.type = date && time ? "datetime-local" : time ? "time" : "date";
    input.value = asText(this.resolve(props.value, ctx.scope));
    input.addEventListener("change", () => this.write(path, input.value));
    return labelled(this, props, ctx, input);
  },
  Image(props, ctx) {
    const url = this.text(props.url ?? props.src, ctx);
    const alt = this.text(props.altText ?? props.alt ?? props.description, ctx);
    if (/^data:image\/(png|jpeg|gif|webp);base64,/.test(url)) {
      const img = el("img");
      img.src = url;
      img.alt = alt;
      return img;
    }
    // The page loads nothing from elsewhere: name the image instead.
    return el("span", "a2-media", `image: ${alt || url}`);
  },
  Icon(props, ctx) {
    return el("span", "a2-icon-name", this.text(props.name ?? props.icon, ctx));
  },
  Video(props, ctx) {
    return el("span", "a2-media", `video: ${this.text(props.url, ctx)}`);
  },
  AudioPlayer(props, ctx) {
    return el("span", "a2-media", `audio: ${this.text(props.description ?? props.url, ctx)}`);
  },
  Chart(props, ctx) {
    const wrap = el("figure", "a2-chart-figure");
    const title = this.text(props.title ?? props.label, ctx);
    const values = this.resolve(props.data ?? props.values ?? props.series, ctx.scope);
    wrap.appendChild(bars(Array.isArray(values) ? values : []));
    if (title) wrap.appendChild(el("figcaption", "", title));
    return wrap;
  },
  File(props, ctx) {
    return el("span", "a2-media", `file: ${this.text(props.name ?? props.fileName ?? props.url, ctx)}`);
  },
  FilePicker(props, ctx) {
    const input = el("input");
    input.type = "file";
    input.disabled = true; // nothing here uploads files
    return labelled(this, props, ctx, input);
  },
  Spacer() {
    return el("div", "a2-spacer-fill");
  },
  Badge(props, ctx) {
    const variant = word(props.variant ?? props.tone ?? props.color);
    return el("span", `a2-badge-${variant || "default"}`, this.text(props.text ?? props.label ?? props.value ?? props.count, ctx));
  },
  Tabs(props, ctx) {
    const items = Array.isArray(props.tabs) ? props.tabs : Array.isArray(props.tabItems) ? props.tabItems : [];
    const wrap = el("div", "a2-tabs-wrap");
    const bar = el("div", "a2-tab-bar");
    const panel = el("div", "a2-tab-panel");
    const chosen = Math.min(this.tabState.get(ctx.id) ?? 0, Math.max(0, items.length - 1));
    items.forEach((item, i) => {
      const tab = el("button", i === chosen ? "a2-tab active" : "a2-tab", this.text(item.title, ctx) || `Tab ${i + 1}`);
      tab.type = "button";
      tab.addEventListener("click", () => {
        this.tabState.set(ctx.id, i);
        this.render();
      });
      bar.appendChild(tab);
    });
    if (items[chosen]) panel.appendChild(this.child(items[chosen].child, ctx));
    wrap.append(bar, panel);
    return wrap;
  },
  Modal(props, ctx) {
    const wrap = el("div", "a2-modal-wrap");
    const dialog = el("dialog", "a2-dialog");
    const contentId = props.content ?? props.contentChild;
    if (contentId) dialog.appendChild(this.child(contentId, ctx));
    const close = el("button", "a2-dialog-close", "Close");
    close.type = "button";
    close.addEventListener("click", () => dialog.close());
    dialog.appendChild(close);
    const triggerId = props.trigger ?? props.entryPointChild;
    const opener = el("div", "a2-modal-trigger");
    if (triggerId) opener.appendChild(this.child(triggerId, ctx));
    opener.addEventListener("click", (ev) => {
      if (!dialog.open && !dialog.contains(ev.target)) dialog.showModal();
    }, true);
    wrap.append(opener, dialog);
    return wrap;
  },
};

function flex(className, props, ctx) {
  const box = el("div", className);
  const justify = word(props.justify ?? props.distribution);
  const align = word(props.align ?? props.alignment);
  if (justify) box.classList.add(`justify-${justify}`);
  if (align) box.classList.add(`align-${align}`);
  for (const child of this.children(props.children, ctx)) box.appendChild(child);
  return box;
}

function choice(props, ctx, multiple) {
  const path = this.boundPath(props.value ?? props.selections, ctx.scope);
  const select = el("select");
  select.multiple = multiple;
  const current = this.resolve(props.value ?? props.selections, ctx.scope);
  const chosen = new Set((Array.isArray(current) ? current : current === undefined ? [] : [current]).map(asText));
  const options = this.resolve(props.options, ctx.scope);
  for (const option of Array.isArray(options) ? options.slice(0, 1000) : []) {
    const value = asText(option && typeof option === "object" ? this.resolve(option.value, ctx.scope) : option);
    const label = option && typeof option === "object" ? this.text(option.label, ctx) || value : value;
    const item = el("option", "", label);
    item.value = value;
    item.selected = chosen.has(value);
    select.appendChild(item);
  }
  select.addEventListener("change", () => {
    const values = Array.from(select.selectedOptions, (o) => o.value);
    this.write(path, multiple || Array.isArray(current) ? values : values[0] ?? null);
  });
  return labelled(this, props, ctx, select);
}
