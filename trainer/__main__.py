from trainer.entry import main

main()
