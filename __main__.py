import sys

from specrelay.cli import main

sys.exit(main())
