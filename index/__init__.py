"""Catalog index and the torch-free core shared by indexing, serving and evaluation.

The modules `imaging`, `preprocess`, `bundle`, `embedder` and `scoring` are the
single implementation of image decoding, model input preparation, model bundle
loading and introspective scoring. `training/` imports them for evaluation, so
the numbers it reports are computed the way the server computes them.
"""
