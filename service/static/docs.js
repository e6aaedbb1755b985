// Renders /openapi.json as a page: one collapsible block per operation, then the schemas.
"use strict";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function schemaText(schema) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.type === "array") return `array of ${schemaText(schema.items)}`;
  let text = schema.type || "object";
  if (schema.format) text += ` (${schema.format})`;
  if (schema.enum) text += `: ${schema.enum.join(" | ")}`;
  if (schema.minimum !== undefined) text += `, ${schema.minimum} to ${schema.maximum}`;
  if (schema.default !== undefined) text += `, default ${schema.default}`;
  return text;
}

function table(headers, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((row) => el("tr", {}, ...row.map((cell) => el("td", {}, cell))))));
}

function operation(path, method, op) {
  const block = el("details", { class: "op", id: op.operationId || `${method}-${path}` });
  block.append(el("summary", {}, el("span", { class: `method ${method}` }, method.toUpperCase()),
    el("span", { class: "path" }, path), ` — ${op.summary || ""}`));
  if (op.description) block.append(el("p", {}, op.description));
  if (op.parameters && op.parameters.length) {
    block.append(el("h3", {}, "Parameters (query string or form fields)"));
    block.append(table(["name", "schema", "description"],
      op.parameters.map((p) => [el("code", {}, p.name), schemaText(p.schema), p.description || ""])));
  }
  if (op.requestBody) {
    block.append(el("h3", {}, "Request body"));
    if (op.requestBody.description) block.append(el("p", {}, op.requestBody.description));
    block.append(table(["content type", "schema"], Object.entries(op.requestBody.content).map(([type, media]) => {
      const props = media.schema && media.schema.properties;
      const text = props ? Object.entries(props).map(([k, v]) => `${k}: ${schemaText(v)}`).join("; ")
        : schemaText(media.schema);
      return [el("code", {}, type), text];
    })));
  }
  block.append(el("h3", {}, "Responses"));
  block.append(table(["status", "description", "body"], Object.entries(op.responses).map(([status, r]) => {
    const content = r.content ? Object.entries(r.content).map(([t, m]) => `${t}: ${schemaText(m.schema)}`).join("; ")
      : "";
    return [el("code", {}, status), r.description || "", content];
  })));
  return block;
}

async function render() {
  const root = document.getElementById("docs");
  try {
    const spec = await (await fetch("/openapi.json")).json();
    document.getElementById("title").textContent = `${spec.info.title} API ${spec.info.version}`;
    document.getElementById("description").textContent = spec.info.description || "";
    root.replaceChildren();
    for (const [path, item] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(item)) root.append(operation(path, method, op));
    }
    root.append(el("h2", {}, "Schemas"));
    for (const [name, schema] of Object.entries(spec.components.schemas)) {
      root.append(el("details", { class: "op", id: `schema-${name}` }, el("summary", {}, el("span", { class: "path" }, name)),
        el("pre", {}, JSON.stringify(schema, null, 2))));
    }
  } catch (err) {
    root.replaceChildren(el("p", { class: "error" }, `Could not load /openapi.json: ${err}`));
  }
}

render();
