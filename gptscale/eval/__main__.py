from gptscale.eval.cli import main

main()
