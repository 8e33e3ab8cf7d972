"""Readers, the embedded demo dataset, tokenisation, image pipeline and collation."""
