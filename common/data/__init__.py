"""Turning a site's files into tensors: decode, sources, synthetic hospitals, cache, splits."""
