from nlpwf.cli import main

main()
