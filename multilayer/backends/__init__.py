"""Built-in backends, one module per broker, each registered by URL scheme in pyproject.toml."""
