"""Connection events: typed records, decoding, schema generation."""
