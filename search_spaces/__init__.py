"""Built-in search spaces (YAML), shipped as package data of attn_search.search_spaces."""
