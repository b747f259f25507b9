from rmflow.cli import main

main()
