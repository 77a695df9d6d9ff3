from rlpipe.cli.main import main

main()
