"""Rendering of per-token maps as self-contained HTML pages (no network, no CDN).

This package sits at the bottom of the layers with :mod:`bayesmanifold.io`: it turns plain
values (summary rows, numpy matrices) into page text and imports nothing else from
bayesmanifold, so analyses may call it to offer ``to_html()``. :mod:`.encoding` is the compact
8-bit code the page carries its matrices in; :mod:`.template` the page itself.
"""

from .html import render_map

__all__ = ["render_map"]
