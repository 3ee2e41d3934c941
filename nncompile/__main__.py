import sys

from nncompile.cli import main

sys.exit(main())
