from glance_migrator.cli import main

main()
