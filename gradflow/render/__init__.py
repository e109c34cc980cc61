"""Rendering of Reports: rich text, the module tree, SARIF."""
