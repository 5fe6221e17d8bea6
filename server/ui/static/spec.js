// The OpenAPI document for the docs pages, fetched with the dashboard's token when it has one (and
// asking for one when the server answers 401), so the docs work whether or not the spec is protected.

const TOKEN_KEY = "shears-token";

function askToken(container, message) {
  return new Promise((resolve) => {
    const form = document.createElement("form");
    form.className = "docs-token";
    const label = document.createElement("label");
    label.htmlFor = "docs-token";
    label.textContent = "Bearer token ";
    const input = document.createElement("input");
    input.id = "docs-token";
    input.type = "password";
    input.autocomplete = "off";
    const button = document.createElement("button");
    button.type = "submit";
    button.textContent = "Load the API description";
    const note = document.createElement("p");
    note.setAttribute("role", "alert");
    note.textContent = message;
    form.append(note, label, input, button);
    container.replaceChildren(form);
    input.focus();
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      form.remove();
      resolve();
    });
  });
}

export async function loadSpec(url, container) {
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(url, { headers, credentials: "omit" });
    if (response.status === 401) {
      await askToken(container, token ? "That token was refused." : "This server needs a token to show its API.");
      continue;
    }
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }
}

export function bearer(request) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token && !request.headers.Authorization) request.headers.Authorization = `Bearer ${token}`;
  return request;
}
