import sys

from .cli import main

if __name__ == "__main__":  # `python -m bnorm`; importing this module (docs tools do) runs nothing
    sys.exit(main())
