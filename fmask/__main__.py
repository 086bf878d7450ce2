from fmask.cli import main

main()
