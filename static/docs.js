// The interactive API reference at /docs: Swagger UI (loaded by the page from /docs/assets/) on
// the bridge's own /openapi.json. Every request goes to this bridge; none to another host.
//
// The key: a browser opens /docs?token=<key> when the bridge has one (the page's form does).
// It is taken out of the address bar at once and sent as "Authorization: Bearer" on the
// page's requests: the document itself, and "Try it out" (through the Authorize dialog).
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const key = params.get("token");
  if (key !== null) {
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }

  const documentUrl = new URL("openapi.json", location.href).href;  // beside /docs, also under a proxy prefix

  const ui = SwaggerUIBundle({
    url: documentUrl,
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",          // no top bar: it would offer to load documents from elsewhere
    deepLinking: true,
    displayRequestDuration: true,
    validatorUrl: null,            // Swagger UI's default asks validator.swagger.io for a badge
    requestInterceptor: (request) => {  // the document; "Try it out" gets the key from Authorize
      if (key && request.url === documentUrl) {
        request.headers = {...request.headers, Authorization: "Bearer " + key};
      }
      return request;
    },
    onComplete: () => {
      if (key) {  // filled in the Authorize dialog, so "Try it out" sends it; the user may change it
        ui.authActions.authorize({bearer: {name: "bearer", schema: {type: "http", scheme: "bearer"}, value: key}});
      }
    },
  });
  window.ui = ui;
})();
