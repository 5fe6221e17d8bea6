"""The web dashboard at /ui and the offline API docs at /docs and /redoc.

Pages are shells (templates/) that fetch everything from the /v1 API with the bearer token the user
typed, so they hold no data and need no token themselves; scripts and styles are static files
(static/, third-party ones vendored under static/vendor/ with their licences). No build step, no CDN.
"""

from __future__ import annotations

from shears.server.ui.routes import PUBLIC_PAGE_PREFIXES, PUBLIC_PAGES, install

__all__ = ["PUBLIC_PAGES", "PUBLIC_PAGE_PREFIXES", "install"]
