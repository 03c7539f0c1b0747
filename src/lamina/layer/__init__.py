"""Layer tar streams: reading, decompression with digest verification, safe extraction."""
