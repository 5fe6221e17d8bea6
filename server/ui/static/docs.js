// Swagger UI from the vendored bundle (a classic script loaded before this module).
import { bearer, loadSpec } from "./spec.js";

const node = document.getElementById("swagger-ui");
const spec = await loadSpec(node.dataset.openapiUrl, node);
globalThis.SwaggerUIBundle({
  spec,
  domNode: node,
  deepLinking: true,
  presets: [globalThis.SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  requestInterceptor: bearer, // "Try it out" carries the dashboard's token
});
