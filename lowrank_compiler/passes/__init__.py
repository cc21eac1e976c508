"""Rewrites of the IR over an adapter's life, one pass per file, each returning a PassResult; the pass manager
(manager) and the named pass lists (pipelines).

A pass never imports another pass; only ``pipelines`` and ``manager`` combine passes.
May import: ``errors``, ``quiet``, ``methods``, ``ir``, ``safety``, ``spec``.
"""
