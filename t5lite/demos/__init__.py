"""The demos behind `make demo`, `make demo-curve` and `make cards`: they use the library; the library never imports them."""
