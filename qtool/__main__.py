from qtool.cli.app import main

main()
