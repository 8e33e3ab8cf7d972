"""One reader per real dataset format."""
