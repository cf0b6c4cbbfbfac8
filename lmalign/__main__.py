from lmalign.cli import main

main()
