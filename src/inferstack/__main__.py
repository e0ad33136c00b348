from inferstack.cli.main import main

main()
