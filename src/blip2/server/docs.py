"""GET /docs: a small page that lists the API from /openapi.json, with no script or style from elsewhere.

FastAPI's own /docs (Swagger UI) loads its JavaScript and CSS from a CDN (cdn.jsdelivr.net): offline, or
behind a firewall, it is a blank page. This one works wherever the service does; any OpenAPI tool can read
/openapi.json for more.
"""

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>blip2 API</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{font-size:1.05rem;margin:1.6rem 0 .3rem}code,pre{font:13px ui-monospace,monospace}
pre{background:#f4f4f4;padding:.6rem;overflow:auto}.m{font-weight:bold;color:#05a}
</style></head>
<body><h1>blip2 API</h1>
<p>The machine-readable schema is <a href="openapi.json">openapi.json</a>.</p>
<main id="api">Loading the schema...</main>
<script>
fetch("openapi.json").then(r => r.json()).then(spec => {
  const main = document.getElementById("api");
  main.textContent = "";
  const add = (tag, text, cls) => {
    const e = document.createElement(tag); e.textContent = text; if (cls) e.className = cls;
    main.appendChild(e); return e;
  };
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const h = add("h2", ""); const m = document.createElement("span");
      m.className = "m"; m.textContent = method.toUpperCase() + " "; h.append(m, path);
      if (op.description || op.summary) add("p", op.description || op.summary);
      const body = op.requestBody && op.requestBody.content;
      for (const [type, media] of Object.entries(body || {})) {
        add("p", "Request body (" + type + "):");
        add("pre", JSON.stringify(media.schema, null, 2));
      }
    }
  }
}).catch(e => { document.getElementById("api").textContent = "Could not load openapi.json: " + e; });
</script></body></html>
"""
