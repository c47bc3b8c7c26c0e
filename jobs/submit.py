"""Submit a streamssl command to a Ray cluster: ``python jobs/submit.py --address URL CONFIG [k=v ...]``.

Same arguments as ``streamssl submit`` (see jobs/README.md); works from a plain checkout too.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import streamssl  # noqa: F401
except ImportError:  # not pip-installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamssl.jobs import main

if __name__ == "__main__":
    sys.exit(main())
