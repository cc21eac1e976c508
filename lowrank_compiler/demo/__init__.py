"""`lrc demo`: the whole pipeline on the embedded all-MiniLM-L6-v2 (not part of the core package API).

May import: every layer below the CLI.
"""
