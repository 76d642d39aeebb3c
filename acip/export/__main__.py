"""``python -m acip.export run_dir=... ratio=0.6 [quantize=entropy quantize.lam=14.5] [out=...]``."""
from acip.cli.export import main

main()
