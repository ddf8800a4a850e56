"""DVC stage entrypoints: run as `python -m stages.<name>` from the project root.

(Run as modules, not as files: `stages/tokenize.py` run as a file would shadow
the standard library `tokenize` module.)
"""
