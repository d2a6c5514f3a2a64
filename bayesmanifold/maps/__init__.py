"""Rendering of per-token maps as self-contained HTML pages (no network, no CDN).

This package sits at the bottom of the layers with :mod:`bayesmanifold.io`: it turns plain
JSON-safe dicts (``RoutingMap.to_dict()``) into page text and imports nothing else from
bayesmanifold, so analyses may call it to offer ``to_html()``.
"""

from .html import render_map

__all__ = ["render_map"]
