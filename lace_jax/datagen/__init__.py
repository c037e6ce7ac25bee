"""Synthetic multi-thread training data (spec section 7; mode `datagen`, see `pipeline`).

An application of the library: the HTTP generator needs the `datagen` extra."""
