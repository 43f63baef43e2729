"""The alert rules: rejection storms, data-limit blocks, attach loops."""
