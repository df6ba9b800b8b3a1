"""``python -m trak_core``: the ``trak-core`` command (``python -m trak_core --help`` lists its commands)."""
from .cli import main

if __name__ == "__main__":
    main()
