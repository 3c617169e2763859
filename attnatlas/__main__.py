import sys

from attnatlas.cli import main

sys.exit(main())
