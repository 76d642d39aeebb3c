"""``python -m acip.compress``: see :mod:`acip.cli.compress`."""
from acip.cli.compress import main

if __name__ == "__main__":
    main()
