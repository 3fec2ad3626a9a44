"""Shipped public-domain corpora (compressed JSON lines), their TFDS builders and build script."""
