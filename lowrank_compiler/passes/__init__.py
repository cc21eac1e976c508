"""Graph passes, one per file: mode, match, insert, initialize, merge, strip."""
