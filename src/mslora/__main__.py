import sys

from mslora.cli import main

sys.exit(main())
