import sys

from duo.cli.main import main

if __name__ == "__main__":  # importing the module (tests, tools) must not run the CLI
    sys.exit(main())
