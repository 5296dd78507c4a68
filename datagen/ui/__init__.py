"""`datagen ui`: a local, read-only web viewer over the store (runs, items, rejections, lineage, plots).

    datagen ui --db sqlite:///datagen.db      # then open http://127.0.0.1:8765

Server-rendered pages (FastAPI + Jinja2 with autoescape), no JavaScript build step and no CDN: templates/ and
static/ ship inside this package, so it works offline. Every route reads through storage.queries (shared with
`datagen runs`) or datagen.ui.queries.
"""
