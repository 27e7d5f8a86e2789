"""A toy fourth dataset, installed as a plugin (entry point `codistill.datasets`): lines of 8 bits, label = the
XOR of the first two. tests/test_plugin.py adds it without touching a file of the project (docs/extending.md)."""
