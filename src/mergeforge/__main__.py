from mergeforge.cli import main

main()
