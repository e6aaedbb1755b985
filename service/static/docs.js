// Renders /openapi.json as a page: one collapsible block per operation (with curl and Python examples), then the
// schemas. Text in `backticks` is shown as code.
"use strict";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

// "the field `image`" -> ["the field ", <code>image</code>]: the spec's descriptions mark code with backticks.
function rich(text) {
  return String(text || "").split("`").map((part, i) => (i % 2 ? el("code", {}, part) : part));
}

function richEl(tag, attrs, text) {
  return el(tag, attrs, ...rich(text));
}

// The multipart file field of an operation, whether it takes several files, and a readable response type.
function uploadField(op) {
  const media = op.requestBody && op.requestBody.content && op.requestBody.content["multipart/form-data"];
  const props = media && media.schema && media.schema.properties;
  if (!props) return null;
  const name = (media.schema.required || Object.keys(props))[0];
  return { name, many: props[name] && props[name].type === "array" };
}

function returnsJson(op) {
  const ok = op.responses && op.responses["200"];
  return Boolean(ok && ok.content && ok.content["application/json"]);
}

// Copy-paste examples for one route: curl, then Python with requests.
function examples(base, path, method, op) {
  const url = base + path;
  const field = uploadField(op);
  const query = op.parameters && op.parameters.some((p) => p.name === "num_captions") ? "?num_captions=3" : "";
  const read = returnsJson(op) ? ".json()" : ".text";
  let curl;
  let python;
  if (method === "get") {
    curl = `curl ${url}`;
    python = `import requests\n\nresponse = requests.get("${url}")\nprint(response${read})`;
  } else if (field && field.many) {
    curl = `curl -F ${field.name}=@dog.jpg -F ${field.name}=@beach.jpg "${url}${query}"`;
    python = "import requests\n\n" +
      `files = [("${field.name}", open(name, "rb")) for name in ("dog.jpg", "beach.jpg")]\n` +
      `response = requests.post("${url}${query}", files=files)\nprint(response${read})`;
  } else if (field) {
    curl = `curl -F ${field.name}=@dog.jpg "${url}${query}"`;
    python = "import requests\n\n" + `with open("dog.jpg", "rb") as f:\n` +
      `    response = requests.post("${url}${query}", files={"${field.name}": f})\nprint(response${read})`;
  } else {
    curl = `curl -X ${method.toUpperCase()} ${url}`;
    python = `import requests\n\nresponse = requests.${method}("${url}")\nprint(response${read})`;
  }
  return [el("h3", {}, "Examples"), el("pre", { class: "example curl" }, curl),
    el("pre", { class: "example python" }, python)];
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

function operation(base, path, method, op) {
  const block = el("details", { class: "op", id: op.operationId || `${method}-${path}` });
  block.append(el("summary", {}, el("span", { class: `method ${method}` }, method.toUpperCase()),
    el("span", { class: "path" }, path), ` — ${op.summary || ""}`));
  if (op.description) block.append(richEl("p", {}, op.description));
  if (op.parameters && op.parameters.length) {
    block.append(el("h3", {}, "Parameters (query string or form fields)"));
    block.append(table(["name", "schema", "description"],
      op.parameters.map((p) => [el("code", {}, p.name), schemaText(p.schema), richEl("span", {}, p.description)])));
  }
  if (op.requestBody) {
    block.append(el("h3", {}, "Request body"));
    if (op.requestBody.description) block.append(richEl("p", {}, op.requestBody.description));
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
    return [el("code", {}, status), richEl("span", {}, r.description), content];
  })));
  block.append(...examples(base, path, method, op));
  return block;
}

async function render() {
  const root = document.getElementById("operations");  // not "docs": that is the id of the /docs route's block
  try {
    const spec = await (await fetch("/openapi.json")).json();
    const title = /\bAPI\b/.test(spec.info.title) ? spec.info.title : `${spec.info.title} API`;
    document.getElementById("title").replaceChildren(title, " ",
      el("span", { class: "version" }, `version ${spec.info.version}`));
    document.title = title;
    document.getElementById("description").replaceChildren(...rich(spec.info.description));
    const base = (spec.servers && spec.servers[0] && spec.servers[0].url) || window.location.origin;
    root.replaceChildren();
    for (const [path, item] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(item)) root.append(operation(base, path, method, op));
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
