"""python -m kdkernels: versions, build, backends, devices and a self-check (see _info.py)."""

import sys

from kdkernels._info import main

sys.exit(main())
