#!/usr/bin/env python
"""Entry point: ``python run_search.py --space sparse`` (see ``--help``)."""

import sys

from attn_search.cli import search_main

if __name__ == "__main__":
    sys.exit(search_main())
