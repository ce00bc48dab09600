"""diffusekit.utils: small helpers shared by the library and the CLI."""
