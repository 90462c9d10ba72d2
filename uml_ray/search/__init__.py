"""Search spaces (YAML distributions over config fields, checked before launch) and sweep plots."""
