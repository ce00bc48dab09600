import sys

from diffusekit.cli.main import main

sys.exit(main())
