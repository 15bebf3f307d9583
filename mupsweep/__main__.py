"""`python -m mupsweep`: the same command line as the `mupsweep` script."""

from mupsweep.cli import main

main()
