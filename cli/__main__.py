"""`python -m cli ...` is `rtprop ...`."""
from cli.main import main

main()
