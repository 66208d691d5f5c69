"""Published reference numbers shipped with kdbench (see SOURCES.md)."""
