"""``python -m imageshare_server``: the same as the ``imageshare-server`` command."""

import sys

from imageshare_server.app import main

sys.exit(main())
