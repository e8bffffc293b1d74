import sys

from nnunet_plugins.cli import main

sys.exit(main())
