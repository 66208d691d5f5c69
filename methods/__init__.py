"""Built-in distillation methods, one file each; installed as ``kdbench.methods`` and registered through the
``kdbench.methods`` entry-point group, exactly like a third-party plugin."""
