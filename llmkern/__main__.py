import sys

from llmkern.cli import main

sys.exit(main())
