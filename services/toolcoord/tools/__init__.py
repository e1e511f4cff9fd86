"""Server-side tools: built-ins (calculator, python, http_fetch) and the registry that names them."""
