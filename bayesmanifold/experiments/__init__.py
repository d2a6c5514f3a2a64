"""The papers' experiments as functions (Paper II's EM-like vs SGD on the sticky chain)."""
