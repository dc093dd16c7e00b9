import sys

from irs_callbacks.cli import main

sys.exit(main())
