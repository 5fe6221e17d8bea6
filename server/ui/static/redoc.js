// ReDoc from the vendored standalone bundle; its injected styles carry the page's CSP nonce.
import { loadSpec } from "./spec.js";

const node = document.getElementById("redoc");
const spec = await loadSpec(node.dataset.openapiUrl, node);
globalThis.Redoc.init(spec, { nonce: node.dataset.nonce, hideDownloadButton: false }, node);
